"""The runs manifest: one row per run recording its config, versions, device, status and timings."""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

import pandas as pd

from xai_audit.storage.parquet import ResultsStore, safe_name

RUN_STATUSES = ("running", "completed", "partial", "failed")
_PACKAGES = ("xai-audit", "torch", "torchvision", "grad-cam", "lime", "open_clip_torch", "prefect", "pyarrow")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour shapes the results."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def new_run_id(config_name: str, now: datetime | None = None) -> str:
    """A sortable, unique run id: UTC time, config name, random suffix."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}-{safe_name(config_name)}-{secrets.token_hex(3)}"


@dataclass
class RunRecord:
    """The manifest row of one run; :meth:`save` rewrites it atomically."""

    run_id: str
    config_name: str
    config_json: str
    config_hash: str
    device: str
    status: str = "running"
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    finished_at: datetime | None = None
    versions: str = field(default_factory=lambda: json.dumps(package_versions(), sort_keys=True))
    hostname: str = field(default_factory=socket.gethostname)
    pid: int | None = field(default_factory=os.getpid)
    timings: dict[str, float] = field(default_factory=dict)
    n_errors: int = 0
    message: str | None = None
    precision: str | None = None
    """The explain stage's autocast precision as resolved on this machine (``explain.precision: auto``)."""
    cpu_kernels: str | None = None
    """The CPU's precision path (torch's kernel capability, bf16 instructions) the run computed on."""

    def save(self, store: ResultsStore) -> None:
        if self.status not in RUN_STATUSES:
            raise ValueError(f"status {self.status!r} not in {RUN_STATUSES}")
        row = {
            "config_name": self.config_name,
            "status": self.status,
            "config_json": self.config_json,
            "config_hash": self.config_hash,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "versions": self.versions,
            "device": self.device,
            "hostname": self.hostname,
            "pid": self.pid,
            "timings_json": json.dumps(self.timings, sort_keys=True),
            "n_errors": self.n_errors,
            "message": self.message,
            "precision": self.precision,
            "cpu_kernels": self.cpu_kernels,
        }
        store.write("runs", self.run_id, "run", [row])

    @classmethod
    def load(cls, store: ResultsStore, run_id: str) -> RunRecord:
        frame = store.read("runs", run_id)
        if frame.empty:
            raise KeyError(f"no run {run_id!r} under {store.root}")
        row = frame.iloc[0]
        return cls(
            run_id=row.run_id,
            config_name=row.config_name,
            config_json=row.config_json,
            config_hash=row.config_hash,
            device=row.device,
            status=row.status,
            started_at=row.started_at.to_pydatetime(),
            finished_at=None if pd.isna(row.finished_at) else row.finished_at.to_pydatetime(),
            versions=row.versions,
            hostname=row.hostname,
            pid=None if pd.isna(row.pid) else int(row.pid),
            timings=json.loads(row.timings_json or "{}"),
            n_errors=int(row.n_errors or 0),
            message=None if pd.isna(row.message) else row.message,
            precision=row.get("precision") if isinstance(row.get("precision"), str) else None,
            cpu_kernels=row.get("cpu_kernels") if isinstance(row.get("cpu_kernels"), str) else None,
        )


def list_runs(store: ResultsStore) -> pd.DataFrame:
    """Every run, newest first, with its duration in seconds."""
    frame = store.read("runs")
    if frame.empty:
        return frame
    frame["seconds"] = (frame["finished_at"] - frame["started_at"]).dt.total_seconds()
    return frame.sort_values("started_at", ascending=False).reset_index(drop=True)
