"""Listing pages with cursors, on both backends: every item once, in order, whatever the page size."""
from __future__ import annotations

import pytest

from prompt_store import Store
from prompt_store.pages import InvalidCursor, job_page, task_page
from prompt_store.records import JobRecord
from tests.prompt_store.conftest import make_blob, meta_for


def _all_pages(lister, *args, limit: int) -> tuple[list, int]:
    items, cursor, pages = [], None, 0
    while True:
        page = lister(*args, limit, cursor)
        items += page.items
        pages += 1
        assert len(page.items) <= limit
        if page.next_cursor is None:
            return items, pages
        cursor = page.next_cursor


@pytest.mark.parametrize("limit", [1, 2, 5, 100])
def test_task_pages_list_every_task_once_by_id(store: Store, limit: int) -> None:
    names = ["zeta", "alpha", "mid", "beta-2", "beta"]
    for i, name in enumerate(names):
        blob = make_blob(i)
        store.put_task("t1", name, blob, meta_for(blob))
    store.put_task("t2", "other", make_blob(9), meta_for(make_blob(9)))  # another tenant's
    assert store.list_task_ids("t1") == sorted(names)
    items, pages = _all_pages(task_page, store, "t1", limit=limit)
    assert [i.task_id for i in items] == sorted(names)
    assert pages == max(1, -(-len(names) // limit))


def test_a_task_deleted_between_pages_is_skipped_and_nothing_repeats(store: Store) -> None:
    for i, name in enumerate(["a", "b", "c", "d"]):
        store.put_task("t1", name, make_blob(i), meta_for(make_blob(i)))
    first = task_page(store, "t1", 2)
    assert [i.task_id for i in first.items] == ["a", "b"]
    store.delete_task("t1", "c")
    store.put_task("t1", "aa", make_blob(7), meta_for(make_blob(7)))  # sorts before the cursor: not on later pages
    rest = task_page(store, "t1", 2, first.next_cursor)
    assert [i.task_id for i in rest.items] == ["d"] and rest.next_cursor is None


@pytest.mark.parametrize("limit", [1, 3, 50])
def test_job_pages_list_every_job_once_newest_first(store: Store, limit: int) -> None:
    jobs = [JobRecord.new("t1", "cats" if i % 2 else "dogs", now=1000.0 + i // 2, job_id=f"job-{i}")
            for i in range(7)]  # pairs share a creation time: the id breaks the tie
    for job in jobs:
        store.create_job(job)
    expected = sorted(jobs, key=lambda j: (j.created_at, j.job_id), reverse=True)
    items, _ = _all_pages(job_page, store, "t1", limit=limit)
    assert [j.job_id for j in items] == [j.job_id for j in expected]
    cats, _ = _all_pages(lambda *a: job_page(*a, task_id="cats"), store, "t1", limit=limit)
    assert [j.job_id for j in cats] == [j.job_id for j in expected if j.task_id == "cats"]


@pytest.mark.parametrize("cursor", ["nonsense!", "W10", "WyJqb2JzIiwxLCJ4Il0"])  # [] / a jobs cursor
def test_a_cursor_not_handed_out_is_refused(store: Store, cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        task_page(store, "t1", 10, cursor)
    if cursor != "WyJqb2JzIiwxLCJ4Il0":
        with pytest.raises(InvalidCursor):
            job_page(store, "t1", 10, cursor)
