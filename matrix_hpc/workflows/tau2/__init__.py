"""tau2-bench's domains (retail, airline, telecom), exact to tau2-bench at commit a2c02472.

Environments behave as tau2's -- tool names, parameters, outputs, error texts,
DB hashes and quirks -- and are checked against golden files that real
tau2-bench produced (``scripts/tau2_golden.py``). See ``docs/tau2.md``.

Example::

    from matrix_hpc.workflows.tau2.tasks import build_environment, load_tasks

    task = load_tasks("retail")[0]
    env = build_environment("retail", task)
    env.call("find_user_id_by_email", {"email": "nobody@example.com"}).text   # 'Error: User not found'
"""
