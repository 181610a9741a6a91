"""Where and how a run writes its output (group ``output``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OutputConf:
    dir: str = "???"  # output directory (created; rerun the same command to resume)
    num_shards: int = 4  # shards by hash of task id (shard=NNNNN directories)
    num_sinks: int | None = None  # sink actors writing the shards (each owns num_shards / num_sinks); None: auto
    flush_interval_s: float = 1.0  # how often buffered rows are committed (each commit: a file per shard)
    max_buffered_rows: int = 20000  # commit early at this many rows (or half the concurrency per sink)
    compact_min_files: int = 64  # merge a shard's small files once it has this many
    compression: str = "zstd"  # Parquet compression codec
    keep: str = "all"  # all | ok: with ok, filtered/failed rows go to _rejected/ (still counted)
    commit_retry_max_s: float = 30.0  # a failed commit is retried after 0.4 s, doubling up to this
    sink_host: str = "auto"  # actors: each sink its own process | workers: sink n inside worker n | auto

    def __post_init__(self) -> None:
        if self.num_sinks is not None and self.num_sinks < 1:
            raise ValueError(f"output.num_sinks={self.num_sinks}: must be >= 1 (or null: chosen by the run)")
        if self.num_sinks is not None and self.num_sinks > self.num_shards:
            raise ValueError(f"output.num_sinks={self.num_sinks} > output.num_shards={self.num_shards}: "
                             "a sink owns whole shards; lower num_sinks or raise num_shards")
        if self.keep not in ("all", "ok"):
            raise ValueError(f"output.keep={self.keep!r}; valid choices: all, ok")
        if self.commit_retry_max_s <= 0:
            raise ValueError(f"output.commit_retry_max_s={self.commit_retry_max_s}: must be > 0 (seconds)")
        if self.sink_host not in SINK_HOSTS:
            raise ValueError(f"output.sink_host={self.sink_host!r}; valid choices: {', '.join(SINK_HOSTS)}")


SINK_HOSTS = ("auto", "actors", "workers")


class SinkPlacementError(ValueError):
    """The output settings ask for a placement the run's workers cannot give (reported
    before any actor starts, as a configuration error)."""

#: Ray clusters with at most this many CPUs get one sink by default (``output.num_sinks=null``).
SMALL_CLUSTER_CPUS = 4


def resolved_num_sinks(conf: OutputConf, cluster_cpus: float) -> int:
    """The run's number of sink actors: ``output.num_sinks`` when set; otherwise one on a
    Ray of at most ``SMALL_CLUSTER_CPUS`` CPUs, two elsewhere (never more than the shards).

    On a small machine a second sink is one more process competing with the workers and
    the engines for the same cores, for Parquet encoding that one sink keeps up with: on
    2 cores, one sink took 0.45 s off the start (its actor waited for a third worker
    process) and commits twice as many rows per file (docs/performance.md, "Sinks on a
    small machine")."""
    if conf.num_sinks is not None:
        return conf.num_sinks
    return min(conf.num_shards, 1 if cluster_cpus <= SMALL_CLUSTER_CPUS else 2)


def sinks_in_workers(conf: OutputConf, cluster_cpus: float, num_sinks: int, num_workers: int) -> bool:
    """Whether sink ``n`` runs inside worker process ``n`` (``output.sink_host``) instead of
    in a process of its own. ``auto``: inside, on a Ray of at most ``SMALL_CLUSTER_CPUS``
    CPUs with one worker process and one sink (the local default on a small machine).

    Every Ray process costs CPU even when idle (Ray 2.60 wakes each actor's main thread
    every 10 ms to check for signals: about 1% of a core per process here), and every
    row sent from a worker to a sink process is pickled, carried and unpickled. Hosted in
    the worker, the rows reach their sink by reference and one process fewer starts
    (docs/performance.md, "One process fewer"). The sink's commit protocol, restart
    recovery and acknowledgements are the same either way; a killed worker takes its
    sink with it, and the driver re-admits what either held."""
    if conf.sink_host == "workers":
        if num_sinks > num_workers:
            raise SinkPlacementError(f"output.sink_host=workers needs a worker process per sink: {num_sinks} sinks, "
                             f"{num_workers} worker(s); lower output.num_sinks or use output.sink_host=actors")
        return True
    if conf.sink_host == "actors":
        return False
    return cluster_cpus <= SMALL_CLUSTER_CPUS and num_sinks == 1 and num_workers == 1
