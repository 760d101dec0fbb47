"""Work in order over several lanes that each take the next job when free (the nearest-code
search's per-device path on a CPU with one JAX device per core).

Why: one program sharded over every device ends each chunk with every device waiting for the
slowest (its outputs are gathered), and on a CPU the slowest is whichever core also ran the host's
work (reading, row building, Parquet) or had more tiles left to visit. Lanes that each run whole
chunks on their own device, pulling the next chunk when done, let a slowed lane take fewer: the
devices stay busy and the rows are the same (a row's answer does not depend on its chunk).
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


def in_order(jobs: Iterable[Job], lanes: Sequence[Callable[[Job], Callable[[], Result]]],
             ahead: int) -> Iterator[Result]:
    """Every job's result, yielded in the jobs' order. `lanes[i](job)` starts a job (e.g. queues
    it on device i) and returns a function that waits for its result; lane i runs on its own
    thread, holding one started job while it starts the next, so its device has the next job
    queued while the thread waits for Python's lock. A lane takes the next job whenever it is
    free. At most `ahead` (≥ 2 × len(lanes)) jobs are taken and not yet yielded, so memory is
    bounded by `ahead` results. A lane's exception is raised here, at its job's place in the
    order; closing the iterator early stops the lanes after their current jobs."""
    jobs = iter(jobs)
    cond = threading.Condition()
    slots = threading.Semaphore(max(ahead, 2 * len(lanes)))
    results: dict[int, tuple[bool, object]] = {}
    state = {"taken": 0, "exhausted": False, "stop": False}

    def publish(seq: int, wait: Callable[[], Result]) -> None:
        try:
            out = (True, wait())
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            out = (False, e)
        with cond:
            results[seq] = out
            cond.notify_all()

    def failed(e: BaseException) -> Callable[[], Result]:
        def wait() -> Result:
            raise e
        return wait

    def run(lane: Callable[[Job], Callable[[], Result]]) -> None:
        held = None  # (seq, wait) of the job started last, not yet published
        try:
            while True:
                if not slots.acquire(blocking=False):
                    if held is not None:  # the caller may be waiting for it: finish it first
                        publish(*held)
                        held = None
                    slots.acquire()
                with cond:
                    if state["stop"] or state["exhausted"]:
                        return
                    try:
                        job = next(jobs)
                    except StopIteration:
                        state["exhausted"] = True
                        cond.notify_all()
                        return
                    except BaseException as e:  # the jobs' iterator failed: raised in order
                        state["exhausted"] = True
                        results[state["taken"]] = (False, e)
                        state["taken"] += 1
                        cond.notify_all()
                        return
                    seq = state["taken"]
                    state["taken"] += 1
                try:
                    wait = lane(job)
                except BaseException as e:  # noqa: BLE001
                    wait = failed(e)
                if held is not None:
                    publish(*held)
                held = (seq, wait)
        finally:
            if held is not None:
                publish(*held)

    threads = [threading.Thread(target=run, args=(lane,), name=f"lane-{i}", daemon=True)
               for i, lane in enumerate(lanes)]
    for t in threads:
        t.start()
    try:
        seq = 0
        while True:
            with cond:
                while seq not in results and not (state["exhausted"] and seq >= state["taken"]):
                    cond.wait()
                if seq not in results:
                    return
                ok, value = results.pop(seq)
            slots.release()
            if not ok:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
            seq += 1
    finally:
        with cond:
            state["stop"] = True
        for _ in threads:
            slots.release()
        for t in threads:
            t.join()
