"""Client-side routing: least outstanding, bounded-load stickiness, health."""

from __future__ import annotations

from collections import Counter

from matrix_hpc.services.llm.routing import Router

URLS = {"r0": "http://h0:8000/v1", "r1": "http://h1:8000/v1", "r2": "http://h2:8000/v1"}


def make_router(factor: float = 1.5, **kw: int) -> Router:
    router = Router(max_load_factor=factor, seed=0, **kw)
    router.update(URLS)
    return router


def load(router: Router, replica_id: str, n: int) -> None:
    replica = router.get(replica_id)
    assert replica is not None
    for _ in range(n):
        router.acquire(replica)


def test_least_outstanding_wins() -> None:
    router = make_router()
    load(router, "r0", 2)
    load(router, "r1", 1)
    assert router.pick().replica_id == "r2"
    load(router, "r2", 3)
    assert router.pick().replica_id == "r1"


def test_ties_are_spread() -> None:
    router = make_router()
    picks = Counter(router.pick().replica_id for _ in range(300))
    assert set(picks) == set(URLS) and min(picks.values()) > 50


def test_outstanding_follows_acquire_and_release() -> None:
    router = make_router()
    replicas = []
    for _ in range(9):
        replica = router.pick()
        router.acquire(replica)
        replicas.append(replica)
    assert sorted(r.outstanding for r in router.replicas) == [3, 3, 3]
    for replica in replicas:
        router.release(replica)
    assert [r.outstanding for r in router.replicas] == [0, 0, 0]


def test_sticky_key_keeps_its_replica_under_moderate_load() -> None:
    router = make_router()
    first = router.pick(sticky_key="task-1")
    router.acquire(first)
    # Other traffic lands elsewhere; the task's replica is busier but within the bound.
    for _ in range(2):
        other = router.pick()
        router.acquire(other)
    for _ in range(10):
        assert router.pick(sticky_key="task-1").replica_id == first.replica_id
    assert router.pinned_to("task-1") == first.replica_id


def test_sticky_key_leaves_an_overloaded_replica_and_repins() -> None:
    router = make_router(factor=1.5)
    pinned = router.pick(sticky_key="task-1").replica_id
    load(router, pinned, 10)  # 10 outstanding vs average ~3.7: beyond 1.5x
    moved = router.pick(sticky_key="task-1")
    assert moved.replica_id != pinned
    assert moved.outstanding == 0
    assert router.pinned_to("task-1") == moved.replica_id


def test_down_replica_is_excluded_and_comes_back() -> None:
    router = make_router()
    router.mark_down("r0")
    assert "r0" not in {router.pick().replica_id for _ in range(100)}
    assert [r.replica_id for r in router.down()] == ["r0"]
    router.mark_up("r0")
    assert "r0" in {router.pick().replica_id for _ in range(100)}


def test_sticky_task_moves_off_a_down_replica() -> None:
    router = make_router()
    pinned = router.pick(sticky_key="t").replica_id
    router.mark_down(pinned)
    moved = router.pick(sticky_key="t").replica_id
    assert moved != pinned and router.pinned_to("t") == moved


def test_retry_avoids_replicas_already_tried() -> None:
    router = make_router()
    assert router.pick(exclude={"r0", "r1"}).replica_id == "r2"
    # Everything tried: a healthy one is reused rather than giving up.
    assert router.pick(exclude={"r0", "r1", "r2"}) is not None


def test_all_down_still_tries_one() -> None:
    router = make_router()
    for rid in URLS:
        router.mark_down(rid)
    assert router.pick() is not None
    assert router.pick(exclude={"r0", "r1"}).replica_id == "r2"


def test_no_replicas_gives_none() -> None:
    assert Router().pick() is None


def test_update_keeps_counts_and_revives_a_restarted_replica() -> None:
    router = make_router()
    load(router, "r1", 2)
    router.mark_down("r1")
    router.update({**URLS, "r1": "http://h1:9999/v1"})  # restarted on a new port
    r1 = router.get("r1")
    assert r1 is not None and r1.healthy and r1.outstanding == 2 and r1.base_url.endswith(":9999/v1")


def test_removed_replica_is_not_picked_and_its_pins_move() -> None:
    router = make_router()
    router.update({"r0": URLS["r0"]})
    router.update(URLS)
    pinned = router.pick(sticky_key="t").replica_id
    router.update({k: v for k, v in URLS.items() if k != pinned})
    assert router.pick(sticky_key="t").replica_id != pinned
    assert len(router.replicas) == 2


def test_release_after_removal_does_not_corrupt_totals() -> None:
    router = make_router()
    replica = router.pick()
    router.acquire(replica)
    router.update({k: v for k, v in URLS.items() if k != replica.replica_id})
    router.release(replica)
    assert router._total_outstanding == 0


def test_pins_are_bounded_lru() -> None:
    router = make_router(max_sticky_keys=3)
    for i in range(5):
        router.pick(sticky_key=f"t{i}")
    assert router.pinned_to("t0") is None and router.pinned_to("t1") is None
    assert router.pinned_to("t4") is not None
    router.forget("t4")
    assert router.pinned_to("t4") is None
