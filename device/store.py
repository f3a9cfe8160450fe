"""A folder of heads with atomic commits, one previous head kept, rollback and confirm.

Layout::

    heads/STATE.json     {"format": "convexedge.headstore", "format_version": 1, "generation": 7,
                          "current": "h000007", "previous": "h000005", "confirmed": false}
    heads/h000007.npz    heads/h000007.json       (see convexedge.device.artifact)
    heads/h000005.npz    heads/h000005.json

A commit writes the new head's two files (each: temporary file, fsync, ``os.replace``, fsync of the
folder), then ``STATE.json`` the same way. The rename of ``STATE.json`` is the commit point: a crash
before it leaves the old state pointing at complete files (the new files are ignored and swept on
the next open), a crash after it leaves the new head. Old heads are deleted only after the new
state is durable, and never the current or previous one. So a crash at any moment leaves a loadable
head, old or new, never a torn one.

Confirm works like an A/B boot slot: a committed head starts unconfirmed; ``confirm()`` marks it
good once the app has checked it. ``rollback()`` returns to the previous head. A commit made while
the current head is still unconfirmed keeps the last *confirmed* head as the previous one, and
``HeadStore.open(..., on_unconfirmed="rollback")`` reverts an unconfirmed head at start-up.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any, Literal

from convexedge.device.artifact import _fsync_write, fsync_dir, read_head, write_head
from convexedge.device.errors import ArtifactError
from convexedge.device.head import ConvexHead

__all__ = ["HeadStore"]

logger = logging.getLogger(__name__)

_STATE = "STATE.json"
_STORE_FORMAT = "convexedge.headstore"
_STORE_VERSION = 1
_SLOT = re.compile(r"^h(\d{6,})$")


class HeadStore:
    """Durable storage of a device's heads; use :meth:`open` or :meth:`create`, not the constructor.

    Attributes:
        root: the folder.
        trust: ed25519 public key every head must be signed with, or ``None`` (checksums only).

    Example:
        >>> store = HeadStore.create("heads/", head)          # doctest: +SKIP
        >>> store = HeadStore.open("heads/"); store.head       # doctest: +SKIP
    """

    def __init__(
        self,
        root: Path,
        state: dict[str, Any],
        head: ConvexHead,
        *,
        trust: bytes | str | None,
        signing_key: bytes | str | None,
    ) -> None:
        self.root = root
        self.trust = trust
        self._signing_key = signing_key
        self._state = state
        self._head = head
        self._lock = threading.Lock()  # serialises writers; never taken by readers of .head

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        root: str | Path,
        head: ConvexHead,
        *,
        trust: bytes | str | None = None,
        signing_key: bytes | str | None = None,
    ) -> HeadStore:
        """Start a store in ``root`` (created if needed) with ``head`` as its confirmed head.

        Raises:
            ArtifactError: ``root`` already holds a store.
        """
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        if (root / _STATE).exists():
            raise ArtifactError(f"{root} already holds a head store; use HeadStore.open({str(root)!r})")
        cls._check_can_sign(trust, signing_key)
        slot = "h000001"
        write_head(head, root / slot, signing_key=signing_key)
        state = {
            "format": _STORE_FORMAT, "format_version": _STORE_VERSION, "generation": 1,
            "current": slot, "previous": None, "confirmed": True,
        }  # fmt: skip
        _fsync_write(root / _STATE, json.dumps(state, indent=1).encode())
        return cls(root, state, read_head(root / slot, trust=trust), trust=trust, signing_key=signing_key)

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        trust: bytes | str | None = None,
        signing_key: bytes | str | None = None,
        on_unconfirmed: Literal["keep", "rollback"] = "keep",
    ) -> HeadStore:
        """Open a store and load (verify) its current head.

        Args:
            root: the store folder.
            trust: ed25519 public key (32 bytes or hex) every head must be signed with; ``None``
                verifies checksums only.
            signing_key: ed25519 seed used to sign heads this process commits (needed with ``trust``).
            on_unconfirmed: ``"rollback"`` reverts a current head that was never confirmed (boot
                slot behaviour); ``"keep"`` serves it.

        Raises:
            ArtifactError: no store, a malformed state, or the current head fails verification.
        """
        if on_unconfirmed not in ("keep", "rollback"):
            raise ValueError(f"on_unconfirmed must be 'keep' or 'rollback', got {on_unconfirmed!r}")
        root = Path(root)
        state = cls._read_state(root)
        head = read_head(root / state["current"], trust=trust)
        store = cls(root, state, head, trust=trust, signing_key=signing_key)
        store._sweep()
        if on_unconfirmed == "rollback" and not state["confirmed"] and state["previous"] is not None:
            logger.warning(
                "head %s was never confirmed: rolling back to %s", state["current"], state["previous"]
            )
            store.rollback()
        return store

    @staticmethod
    def _read_state(root: Path) -> dict[str, Any]:
        path = root / _STATE
        try:
            state = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ArtifactError(
                f"{root} holds no {_STATE}: not a head store; start one with HeadStore.create"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
        ok = (
            isinstance(state, dict)
            and state.get("format") == _STORE_FORMAT
            and state.get("format_version") == _STORE_VERSION
            and isinstance(state.get("current"), str)
            and _SLOT.match(state["current"]) is not None
            and (state.get("previous") is None or _SLOT.match(str(state["previous"])) is not None)
            and isinstance(state.get("generation"), int)
            and isinstance(state.get("confirmed"), bool)
        )
        if not ok:
            raise ArtifactError(
                f"{path}: expected {_STORE_FORMAT} version {_STORE_VERSION} with current/previous/"
                f"generation/confirmed, got {str(state)[:200]}"
            )
        return state

    @staticmethod
    def _check_can_sign(trust: bytes | str | None, signing_key: bytes | str | None) -> None:
        if trust is not None and signing_key is None:
            raise ArtifactError(
                "this store only accepts heads signed for its trusted key; pass signing_key= to sign commits"
            )

    # ------------------------------------------------------------------ reading
    @property
    def head(self) -> ConvexHead:
        """The current head (an immutable object; read without a lock)."""
        return self._head

    @property
    def current(self) -> str:
        """Slot name of the current head, e.g. ``"h000007"``."""
        return str(self._state["current"])

    @property
    def previous(self) -> str | None:
        """Slot name of the head :meth:`rollback` returns to, or ``None``."""
        prev = self._state["previous"]
        return None if prev is None else str(prev)

    @property
    def confirmed(self) -> bool:
        """Whether the current head was confirmed (or is the store's first head)."""
        return bool(self._state["confirmed"])

    @property
    def generation(self) -> int:
        """Number of the last head written (increases with every commit)."""
        return int(self._state["generation"])

    def load(self, slot: str) -> ConvexHead:
        """Load and verify the head in ``slot`` (e.g. the previous one)."""
        if _SLOT.match(slot) is None:
            raise ArtifactError(f"{slot!r} is not a head slot name like 'h000003'")
        return read_head(self.root / slot, trust=self.trust)

    # ------------------------------------------------------------------ writing
    def _write_state(self, state: dict[str, Any]) -> None:
        _fsync_write(self.root / _STATE, json.dumps(state, indent=1).encode())
        self._state = state

    def commit(self, head: ConvexHead) -> str:
        """Write ``head`` durably and make it current (unconfirmed); returns its slot name.

        The previous head becomes the current one if that was confirmed, else the last confirmed
        head stays previous. The written files are read back and verified before the state moves.

        Raises:
            ArtifactError: the head could not be written or does not verify after writing.
        """
        self._check_can_sign(self.trust, self._signing_key)
        with self._lock:
            state = dict(self._state)
            gen = state["generation"] + 1
            slot = f"h{gen:06d}"
            write_head(head, self.root / slot, signing_key=self._signing_key)
            loaded = read_head(self.root / slot, trust=self.trust)  # refuse to point at a bad file
            prev = state["current"] if state["confirmed"] else (state["previous"] or state["current"])
            new = {**state, "generation": gen, "current": slot, "previous": prev, "confirmed": False}
            self._write_state(new)
            self._head = loaded
            self._sweep()
            return slot

    def confirm(self) -> None:
        """Mark the current head as good (the app checked it); it becomes the rollback target next."""
        with self._lock:
            if not self._state["confirmed"]:
                self._write_state({**self._state, "confirmed": True})

    def rollback(self) -> ConvexHead:
        """Make the previous head current again (confirmed) and return it.

        Raises:
            ArtifactError: there is no previous head, or it fails verification.
        """
        with self._lock:
            prev = self._state["previous"]
            if prev is None:
                raise ArtifactError(f"{self.root}: no previous head to roll back to")
            head = read_head(self.root / prev, trust=self.trust)
            self._write_state({**self._state, "current": prev, "previous": None, "confirmed": True})
            self._head = head
            self._sweep()
            return head

    def _sweep(self) -> None:
        """Delete temporary files and heads that are neither current nor previous."""
        keep = {self._state["current"], self._state["previous"]}
        removed = False
        for path in self.root.iterdir():
            stem = path.name.split(".", 1)[0]
            if path.name.endswith(".tmp") or (_SLOT.match(stem) and stem not in keep):
                try:
                    path.unlink()
                    removed = True
                except OSError:  # pragma: no cover - read-only media: leave it
                    pass
        if removed:
            fsync_dir(self.root)

    def nbytes_on_disk(self) -> int:
        """Bytes the store's files take."""
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())
