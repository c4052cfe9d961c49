"""Stored responses (the Responses API's `store: true`): JSON documents by id in an embedded
SQLite database, so they outlive a restart and a later request can continue from one
(`previous_response_id`). Bounded by age and by count; the oldest go first.

SQLite in WAL mode lets a reader and a writer work at once; each call opens its own connection
on a worker thread, so the event loop never waits on the disk.

Each row has an owner (the name of the key that created it; '' on a server without keys), and
only its owner can read, continue or delete it, as OpenAI scopes them to a project.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    document TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""
# Stores made before responses had owners: their rows belong to the keyless owner ''.
ADD_OWNER = "ALTER TABLE responses ADD COLUMN owner TEXT NOT NULL DEFAULT ''"


@dataclass(frozen=True)
class StoredResponse:
    """A response as answered, the input items it was asked with, and the conversation a next
    turn continues from (chat messages, the turn's own answer included, its instructions not)."""

    id: str
    created_at: float
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]
    owner: str = ""


class ResponseStore:
    def __init__(self, path: Path, *, max_age_seconds: float, max_rows: int) -> None:
        self.path = path
        self._max_age, self._max_rows = max_age_seconds, max_rows
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(responses)")}
            if "owner" not in columns:
                db.execute(ADD_OWNER)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction (committed at the end, rolled back on error)."""
        db = sqlite3.connect(self.path, timeout=10)
        try:
            with db:
                yield db
        finally:
            db.close()

    async def put(self, stored: StoredResponse) -> None:
        await asyncio.to_thread(self._put, stored)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The response, if it is `owner`'s (another's is as unknown as a missing one)."""
        return await asyncio.to_thread(self._get, response_id, owner)

    async def delete(self, response_id: str, owner: str) -> bool:
        """Whether `owner` had such a response to delete."""
        return await asyncio.to_thread(self._delete, response_id, owner)

    def _put(self, stored: StoredResponse) -> None:
        document = json.dumps(
            {
                "response": stored.response,
                "input_items": stored.input_items,
                "conversation": stored.conversation,
            },
            ensure_ascii=False,
        )
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses (id, created_at, document, owner) "
                "VALUES (?, ?, ?, ?)",
                (stored.id, stored.created_at, document, stored.owner),
            )
            db.execute("DELETE FROM responses WHERE created_at < ?", (self._oldest_kept(),))
            db.execute(
                "DELETE FROM responses WHERE id IN (SELECT id FROM responses "
                "ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                (self._max_rows,),
            )

    def _get(self, response_id: str, owner: str) -> StoredResponse | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT created_at, document FROM responses "
                "WHERE id = ? AND owner = ? AND created_at >= ?",
                (response_id, owner, self._oldest_kept()),
            ).fetchone()
        if row is None:
            return None
        document = json.loads(row[1])
        return StoredResponse(
            response_id,
            row[0],
            document["response"],
            document["input_items"],
            document["conversation"],
            owner,
        )

    def _delete(self, response_id: str, owner: str) -> bool:
        with self._connect() as db:
            deleted = db.execute(
                "DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)
            )
            return deleted.rowcount > 0

    def _oldest_kept(self) -> float:
        return time.time() - self._max_age
