"""The dataset store: sharded Parquet output that resumes exactly.

One module per job (see docs/output.md):

- ``layout``: where files live, part file names, publication that never replaces a file;
- ``sink``: the commit protocol (buffer, encode, publish, ack, retry);
- ``lock``: one writer per output directory;
- ``resume``: ``scan_output`` (tidy, quarantine, retry=failed) and the config check;
- ``ids``: compact, exact id sets (8 bytes an id);
- ``verify``: counts read from the disk;
- ``input`` / ``hf_input``: the input rows and their ids;
- ``rows``: the output row and its encoding.

Nothing here imports the runtime or anything above it.
"""
