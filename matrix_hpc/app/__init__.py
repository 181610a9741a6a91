"""The app: composition of one job. It starts Ray and the services (LLM,
sandboxes), builds the runtime's driver from the config and runs it
(:func:`matrix_hpc.app.run.execute`). The only layer below the CLI that
knows every other package."""
