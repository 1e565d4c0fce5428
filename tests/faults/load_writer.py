"""Concurrent feedback writers, run as a process of their own by the feedback-load scenario.

Each thread posts its own outcomes, re-sends every tenth one (a client retry), and also
posts a set of ``feedback_id`` values that every thread shares, so that one id arrives from
several connections at once: from even threads as one outcome, from odd ones as the other
(a conflict). Bounded in count and in time. Prints one JSON document: the status codes,
and for each ``feedback_id`` the (status, churned) of every request that carried it.

    python -m tests.faults.load_writer URL --threads 8 --requests 250 --deadline-s 60
"""

import argparse
import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx

SHARED = 25
"""Outcomes every thread posts: the same ids from all threads at about the same moment."""
RETRY_EVERY = 10


def body(feedback_id: str, user_id: str, churned: bool) -> dict[str, object]:
    observed = datetime.now(UTC) - timedelta(hours=1)
    return {"feedback_id": feedback_id, "user_id": user_id, "churned": churned,
            "observed_at": observed.isoformat(), "source": "load-test"}


def plan(thread: int, requests: int) -> list[dict[str, object]]:
    """The bodies one thread posts, in order: own outcomes, retries, shared ones spread in."""
    bodies: list[dict[str, object]] = []
    shared_at = max(1, requests // SHARED)
    for i in range(requests):
        if i % shared_at == 0 and i // shared_at < SHARED:
            k = i // shared_at
            bodies.append(body(f"shared-{k}", f"u-shared-{k}", (k + thread) % 2 == 0))
        elif i % RETRY_EVERY == RETRY_EVERY - 1 and bodies:
            bodies.append(bodies[-1])
        else:
            bodies.append(body(f"load-{thread}-{i}", f"u{thread:02d}{i:04d}", i % 3 == 0))
    return bodies


def run_thread(url: str, api_key: str | None, bodies: list[dict[str, object]],
               deadline: float, results: list[tuple[str, bool, int | str]]) -> None:
    headers = {"X-API-Key": api_key} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
        for item in bodies:
            if time.monotonic() > deadline:
                return
            try:
                code: int | str = client.post("/feedback", json=item).status_code
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            results.append((str(item["feedback_id"]), bool(item["churned"]), code))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--requests", type=int, default=250)
    parser.add_argument("--deadline-s", type=float, default=60.0)
    parser.add_argument("--api-key")
    args = parser.parse_args()

    started = time.monotonic()
    deadline = started + args.deadline_s
    results: list[tuple[str, bool, int | str]] = []
    threads = [
        threading.Thread(target=run_thread, args=(args.url, args.api_key,
                                                  plan(t, args.requests), deadline, results))
        for t in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answers: dict[str, list[tuple[int | str, bool]]] = {}
    for feedback_id, churned, code in results:
        answers.setdefault(feedback_id, []).append((code, churned))
    print(json.dumps({
        "requests": len(results),
        "seconds": round(time.monotonic() - started, 2),
        "status": {str(k): v for k, v in Counter(code for _, _, code in results).items()},
        "answers": answers,
    }))


if __name__ == "__main__":
    main()
