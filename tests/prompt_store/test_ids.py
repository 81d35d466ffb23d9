"""Ids, Redis keys and local paths: no id can leave its tenant's key prefix or directory."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prompt_store import InvalidId, validate_id
from prompt_store.ids import LocalPaths, RedisKeys, new_job_id, validate_version

VALID = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True).filter(lambda s: s not in (".", ".."))
ANY_TEXT = st.one_of(st.text(max_size=80), VALID, st.sampled_from([".", "..", "../x", "a/b", "a:b", "a\x00b", "",
                                                                    "x" * 65, "a\n", " a", "a/../../b"]))
REFERENCE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")


@given(ANY_TEXT)
def test_validate_id_accepts_exactly_the_documented_alphabet(value: str) -> None:
    ok = bool(REFERENCE.match(value)) and value not in (".", "..")
    if ok:
        assert validate_id(value) == value
    else:
        with pytest.raises(InvalidId):
            validate_id(value, "tenant")


def test_invalid_id_is_a_value_error_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="invalid tenant"):
        validate_id("a/b", "tenant")
    with pytest.raises(InvalidId, match="must be a string"):
        validate_id(3)  # type: ignore[arg-type]
    assert validate_id(new_job_id(), "job id").startswith("job-")


def test_versions_must_be_positive_ints() -> None:
    from prompt_store import VersionNotFound

    assert validate_version(3) == 3
    with pytest.raises(VersionNotFound):
        validate_version(0)
    with pytest.raises(TypeError):
        validate_version(True)
    with pytest.raises(TypeError):
        validate_version("1")  # type: ignore[arg-type]


def _task_keys(k: RedisKeys, tenant: str, task: str) -> list[str]:
    return [k.head(tenant, task), k.versions(tenant, task), k.version(tenant, task, 7), k.counter(tenant, task),
            k.train_lock(tenant, task), k.job(tenant, task), k.tasks(tenant), k.jobs(tenant)]


@given(VALID, VALID, VALID)
def test_redis_keys_stay_under_their_tenant_prefix(prefix: str, tenant: str, task: str) -> None:
    k = RedisKeys(prefix)
    for key in _task_keys(k, tenant, task):
        assert key.startswith(f"{prefix}:t:{tenant}:")
        assert k.tenant_of(key) == tenant
    for key in (k.events(), k.queue(), k.tenants()):
        assert k.tenant_of(key) is None


@given(VALID, VALID, VALID, VALID)
def test_redis_keys_of_different_tasks_never_collide(t1: str, a: str, t2: str, b: str) -> None:
    k = RedisKeys("vpt")
    keys1, keys2 = _task_keys(k, t1, a), _task_keys(k, t2, b)
    assert len(set(keys1)) == len(keys1)
    if t1 != t2:
        assert not set(keys1) & set(keys2)
    elif a != b:
        assert set(keys1) & set(keys2) == {k.tasks(t1), k.jobs(t1)}


@given(ANY_TEXT, ANY_TEXT)
@settings(max_examples=200)
def test_redis_keys_refuse_what_they_cannot_contain(tenant: str, task: str) -> None:
    k = RedisKeys("vpt")
    try:
        key = k.head(tenant, task)
    except InvalidId:
        return
    assert key == f"vpt:t:{tenant}:task:{task}:head" and key.count(":") == 5


@given(ANY_TEXT, ANY_TEXT)
@settings(max_examples=200)
def test_local_paths_stay_inside_the_tenant_directory(tenant: str, task: str) -> None:
    root = Path("/srv/store")
    p = LocalPaths(root)
    try:
        paths = [p.task(tenant, task), p.head(tenant, task), p.version(tenant, task, 3), p.counter(tenant, task),
                 p.job(tenant, task), p.train_lock(tenant, task)]
    except InvalidId:
        return
    tenant_dir = os.path.normpath(root / "tenants" / tenant)
    assert os.path.dirname(tenant_dir) == str(root / "tenants")
    for path in paths:
        normal = os.path.normpath(path)
        assert normal == str(path), "no '.' or '..' component survives validation"
        assert normal.startswith(tenant_dir + os.sep)
    assert p.task(tenant, task).name == task


def test_store_made_names_cannot_be_ids() -> None:
    for name in ("~tmp~0123", "~del~abc", "~trash"):
        with pytest.raises(InvalidId):
            validate_id(name)
