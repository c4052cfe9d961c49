"""Who a request's key says it is: the server's keys, each with a name and a scope.

Keys come from `--api-key` (inference only), `--admin-key` (also /admin/* and a protected
/metrics) and `--api-keys-file` (named keys, re-read on SIGHUP). A key's name, never the key,
is what logs, metrics, rate limits and stored responses know a caller by.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

ADMIN_MARK = "admin"
COMMENT = re.compile(r"(^|\s)#.*$")


@dataclass(frozen=True)
class Caller:
    """Who is calling: a key's name (empty on a server without keys) and whether it is an
    admin key."""

    name: str
    admin: bool = False


# A server without keys has one caller; it owns every stored response.
ANONYMOUS = Caller("")


@dataclass(frozen=True)
class NamedKey:
    name: str
    key: str
    admin: bool


class KeysFileError(ValueError):
    """A keys file that cannot be read; the message names the file and the line."""


def fingerprint_name(key: str, *, admin: bool) -> str:
    """The name of a key given on the command line: a short hash, so the key never shows."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{'admin' if admin else 'key'}-{digest}"


def parse_keys_file(text: str, source: str) -> list[NamedKey]:
    """`NAME: KEY` per line, `NAME: KEY admin` for an admin key; a `#` at the start of a line
    or after a space starts a comment (one inside a key is part of it)."""
    keys: list[NamedKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = COMMENT.sub("", raw).strip()
        if not line:
            continue
        name, colon, rest = line.partition(":")
        words = rest.split()
        admin = len(words) == 2 and words[1] == ADMIN_MARK
        if not colon or not name.strip() or not words or (len(words) == 2) != admin:
            raise KeysFileError(
                f"{source}:{number}: expected 'NAME: KEY' or 'NAME: KEY {ADMIN_MARK}'"
            )
        keys.append(NamedKey(name.strip(), words[0], admin))
    return keys


def read_keys_file(path: Path) -> list[NamedKey]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeysFileError(f"cannot read the keys file {path}: {exc.strerror}") from exc
    return parse_keys_file(text, str(path))


def _checked(keys: list[NamedKey]) -> list[NamedKey]:
    """The keys, if no two share a name or a key (one key under two names or scopes would be
    whichever came last)."""
    names: set[str] = set()
    secrets: dict[str, str] = {}
    for key in keys:
        if key.name in names:
            raise KeysFileError(f"two keys are named {key.name!r}: names must be unique")
        if key.key in secrets:
            raise KeysFileError(f"{key.name!r} and {secrets[key.key]!r} have the same key")
        names.add(key.name)
        secrets[key.key] = key.name
    return keys


class Keyring:
    """The keys a server accepts. `lookup` is constant time in the presented key, so timing
    reveals neither a key nor which one matched."""

    def __init__(
        self,
        api_keys: Iterable[str] = (),
        admin_keys: Iterable[str] = (),
        keys_file: Path | None = None,
    ) -> None:
        self._fixed = [NamedKey(fingerprint_name(k, admin=False), k, False) for k in api_keys]
        self._fixed += [NamedKey(fingerprint_name(k, admin=True), k, True) for k in admin_keys]
        self.keys_file = keys_file
        self._keys = _checked([*self._fixed, *self._from_file()])

    def _from_file(self) -> list[NamedKey]:
        return read_keys_file(self.keys_file) if self.keys_file is not None else []

    def reload(self) -> None:
        """Re-read the keys file; on an error the keys in force stay (and the error is logged)."""
        try:
            keys = _checked([*self._fixed, *self._from_file()])
        except KeysFileError as exc:
            logger.error("keys not reloaded, the previous ones stay in force: {}", exc)
            return
        self._keys = keys
        admins = sum(key.admin for key in keys)
        logger.info("keys reloaded: {} keys, {} of them admin", len(keys), admins)

    @property
    def empty(self) -> bool:
        """Whether no key at all is set (the server is then open, its admin routes local)."""
        return not self._keys and self.keys_file is None

    @property
    def has_admin(self) -> bool:
        return any(key.admin for key in self._keys)

    def lookup(self, presented: str) -> Caller | None:
        given = presented.encode()
        found: NamedKey | None = None
        for key in self._keys:
            if hmac.compare_digest(given, key.key.encode()):
                found = key
        return None if found is None else Caller(found.name, found.admin)

    def first_key(self, *, admin: bool) -> str | None:
        """A key of this scope (for the server's own clients: tests, `vllm-obtain ps`)."""
        return next((key.key for key in self._keys if key.admin == admin), None)
