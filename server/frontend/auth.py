"""API keys -> tenants. Keys may be given plainly or as `sha256:<hex>`; comparison is constant-time."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from prompt_store.ids import validate_id

DEFAULT_TENANT = "default"


class AuthConfigError(ValueError):
    """The configured keys are malformed."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeyRing:
    """sha256 digests of the accepted keys and their tenants; empty = authentication off."""

    entries: tuple[tuple[bytes, str], ...]

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def tenant_for(self, key: str) -> str | None:
        """The key's tenant, or None. Every entry is compared, so timing does not reveal which matched."""
        digest = _digest(key)
        found = None
        for expected, tenant in self.entries:
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found


def parse_keys(spec: str) -> list[tuple[bytes, str]]:
    """`tenant:key` items separated by commas or newlines; `tenant:sha256:<hex>` for hashed keys."""
    out = []
    for raw in spec.replace("\n", ",").split(","):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        tenant, sep, key = item.partition(":")
        if not sep or not key:
            raise AuthConfigError(f"API key entry {item[:16]!r}... must be 'tenant:key'")
        try:
            validate_id(tenant, "tenant")
        except ValueError as e:
            raise AuthConfigError(str(e)) from e
        if key.startswith("sha256:"):
            hexd = key.removeprefix("sha256:")
            try:
                digest = bytes.fromhex(hexd)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise AuthConfigError(f"hashed key for tenant {tenant!r} must be 64 hex digits")
        else:
            if len(key) < 8:
                raise AuthConfigError(f"API key for tenant {tenant!r} is shorter than 8 characters")
            digest = _digest(key)
        out.append((digest, tenant))
    return out


def load_keyring(keys: str | None, keys_file: Path | None) -> KeyRing:
    entries: list[tuple[bytes, str]] = []
    if keys:
        entries += parse_keys(keys)
    if keys_file is not None:
        try:
            entries += parse_keys(Path(keys_file).read_text())
        except OSError as e:
            raise AuthConfigError(f"cannot read VPT_API_KEYS_FILE {keys_file}: {e}") from e
    return KeyRing(tuple(entries))


def hash_key(key: str) -> str:
    """The `sha256:<hex>` form to put in VPT_API_KEYS instead of the key itself."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
