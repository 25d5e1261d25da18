"""One run per character at a time, across processes and machines sharing the state store.

The lock is a row in ``character_locks``; its holder refreshes a heartbeat from a background
thread. A holder is dead when its heartbeat is older than ``stale_s`` (any host) or when it ran on
this host and its process is gone; a dead holder's lock is taken over with a compare-and-swap
update, so two runs can never both win it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from lorafactory.errors import CharacterBusy, StageError
from lorafactory.state.models import CharacterLock as LockRow
from lorafactory.state.models import as_utc
from lorafactory.workspace import utcnow

log = logging.getLogger(__name__)
HEARTBEAT_S = 20.0
STALE_S = 120.0  # six missed heartbeats


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_dead(row: LockRow, stale_s: float) -> bool:
    if utcnow() - as_utc(row.heartbeat_at) > timedelta(seconds=stale_s):
        return True
    return row.host == socket.gethostname() and not pid_alive(row.pid)


class CharacterLockHandle:
    """A held lock: ``release()`` gives it back; ``check()`` raises if another run took it over."""

    def __init__(self, store, slug: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.store, self.slug, self.heartbeat_s = store, slug, heartbeat_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self, stale_s: float) -> LockRow | None:
        """Take the lock; on failure return the live holder's row (detached)."""
        now = utcnow()
        mine = dict(token=self.token, host=socket.gethostname(), pid=os.getpid(), acquired_at=now, heartbeat_at=now)
        try:
            with self.store.session() as session:
                session.add(LockRow(slug=self.slug, **mine))
            return None
        except IntegrityError:
            pass
        with self.store.session() as session:
            row = session.get(LockRow, self.slug)
            if row is None:
                return self.try_acquire(stale_s)  # released meanwhile
            if not holder_dead(row, stale_s):
                session.expunge(row)
                return row
            taken = session.execute(
                update(LockRow).where(LockRow.slug == self.slug, LockRow.token == row.token).values(**mine)
            ).rowcount
        if taken != 1:
            return self.try_acquire(stale_s)  # another run recovered it first: look again
        log.warning("%s: took over the lock of a dead run (pid %d on %s)", self.slug, row.pid, row.host)
        return None

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.slug}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self.store.session() as session:
                    kept = session.execute(
                        update(LockRow)
                        .where(LockRow.slug == self.slug, LockRow.token == self.token)
                        .values(heartbeat_at=utcnow())
                    ).rowcount
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try again next beat
                log.warning("%s: lock heartbeat failed (%s)", self.slug, exc.__class__.__name__)
                continue
            if kept != 1:
                self.lost = True
                return

    def check(self) -> None:
        if self.lost:
            raise StageError(
                f"{self.slug}: another run took over this character (this run's heartbeat was missed); stopping"
            )

    def __enter__(self) -> CharacterLockHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self.store.session() as session:
            session.execute(delete(LockRow).where(LockRow.slug == self.slug, LockRow.token == self.token))


def acquire(
    store,
    slug: str,
    wait: bool = False,
    stale_s: float = STALE_S,
    heartbeat_s: float = HEARTBEAT_S,
    poll_s: float = 2.0,
) -> CharacterLockHandle:
    """Hold ``slug`` for this run; refuse with one line (or wait, with ``wait``) while a live run has it."""
    handle = CharacterLockHandle(store, slug, heartbeat_s)
    announced = False
    while (holder := handle.try_acquire(stale_s)) is not None:
        since = as_utc(holder.acquired_at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        who = f"pid {holder.pid} on {holder.host}, since {since}"
        if not wait:
            raise CharacterBusy(f"{slug} is being run by another lorafactory ({who}); pass --wait to wait for it")
        if not announced:
            log.warning("%s is being run by another lorafactory (%s); waiting", slug, who)
            announced = True
        time.sleep(poll_s)
    handle.start_heartbeat()
    return handle
