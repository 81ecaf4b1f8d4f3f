"""Debounced jobs: every submission the window swallowed names the job that runs."""

from __future__ import annotations

import asyncio

import laneway
from laneway.v1 import job_pb2 as S


async def test_superseded_names_the_job_that_runs(worker, client) -> None:
    # a, b and c 200 ms apart inside one window: a and b both name c (not a -> b -> c).
    ids: list[str] = []
    followers = []
    for text in ("a", "b", "c"):
        if ids:
            await asyncio.sleep(0.2)  # the spacing under test, not synchronisation
        job_id = (await client.submit("chat", laneway.chat(text), debounce_key="doc", debounce=0.8)).job_id
        ids.append(job_id)
        # Follow each job live from its submission, as a caller would.
        followers.append(asyncio.create_task(_final(client, job_id)))
    a, b, c = ids
    finals = await asyncio.gather(*followers)
    assert [f.state for f in finals] == [
        S.JOB_STATE_SUPERSEDED,
        S.JOB_STATE_SUPERSEDED,
        S.JOB_STATE_SUCCEEDED,
    ]
    assert [f.superseded_by for f in finals[:2]] == [c, c]
    assert finals[2].result.chat.text == "c"
    # GetJob and a replay after the fact say the same.
    assert (await client.get_job(a)).superseded_by == c
    replayed = {e.job_id: e async for e in client.stream_results([a, b], final_only=True)}
    assert {e.superseded_by for e in replayed.values()} == {c}


async def _final(client: laneway.AsyncClient, job_id: str) -> S.JobEvent:
    events = [e async for e in client.stream_results(job_id, final_only=True)]
    assert len(events) == 1
    return events[0]


async def test_cancelled_submission_keeps_its_ending(worker, client) -> None:
    a = (await client.submit("chat", laneway.chat("a"), debounce_key="k", debounce=0.5)).job_id
    assert (await client.cancel_job(a)).cancelled
    b = (await client.submit("chat", laneway.chat("b"), debounce_key="k", debounce=0.5)).job_id
    finals = {e.job_id: e async for e in client.stream_results([a, b], final_only=True)}
    assert finals[a].state == S.JOB_STATE_CANCELLED and not finals[a].superseded_by
    assert finals[b].state == S.JOB_STATE_SUCCEEDED


async def test_submissions_over_the_cap_end_at_once(worker, client, monkeypatch) -> None:
    # With room for two replaced jobs on the schedule, the fourth submission pushes the
    # first off the list: it ends at once, naming the fourth; the rest wait for the window.
    monkeypatch.setattr("laneway.broker.server.publish.MAX_REPLACED", 2)
    ids = [
        (await client.submit("chat", laneway.chat(t), debounce_key="cap", debounce=30)).job_id for t in "abcd"
    ]
    first = await client.get_job(ids[0])
    assert (first.state, first.superseded_by) == (S.JOB_STATE_SUPERSEDED, ids[3])
    assert [(await client.get_job(j)).state for j in ids[1:]] == [S.JOB_STATE_SCHEDULED] * 3
