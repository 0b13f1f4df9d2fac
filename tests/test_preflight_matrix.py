"""Everything a run would fail on that can be known without doing the work is refused by
``xai-audit validate`` and by ``xai-audit run`` before Prefect starts: exit 2, one stderr line
naming the field, no traceback, no network attempt, nothing under the results root.

Each case is a valid base config (a tiny ResNet from the ``python`` source, three decodable
images, no labelling) with one thing broken; the base itself validates, so each refusal comes
from the broken item. The CLI runs as a process with networking guarded: a ``sitecustomize`` on
``PYTHONPATH`` makes every connection or name lookup beyond loopback fail and records it in a file
(loopback stays open: the run's private Prefect server listens there). ``HOME``, the Hugging Face
and torch caches point into the test's folder, so nothing on the developer's machine is read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from xai_audit.flows.preflight import synthetic_probe_problems
from xai_audit.tasks.core.config import parse_config

REPO = Path(__file__).resolve().parents[1]
ACCEPTED_CPU_S = 15.0
"""The acceptance's "within 15 s", as CPU seconds of the CLI process itself: its wall time on an idle
machine, unlike the wall time on a shared one. The private Prefect server a run starts meanwhile (on
another core) is not counted; it is stopped with the refusal."""
TIMEOUT_S = 120.0  # wall clock: generous, the machine may be shared
# ``python -m xai_audit.flows.cli`` (the console script's main), writing its own CPU time at exit
CLI = (
    "import resource, sys\n"
    "from xai_audit.flows.cli import main\n"
    "code = main(sys.argv[2:])\n"
    "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_utime + usage.ru_stime))\n"
    "sys.exit(code)\n"
)

NETWORK_GUARD = '''
"""Test guard: connections and name lookups beyond loopback fail and are recorded."""
import ipaddress
import os
import socket

_LOG = os.environ["XAI_TEST_NETWORK_LOG"]
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _local(host):
    if host is None or host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what):
    with open(_LOG, "a") as log:
        log.write(f"{os.getpid()} {what}\\n")
    raise OSError(101, f"network is unreachable (test guard): {what}")


_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex


def getaddrinfo(host, *args, **kwargs):
    if not _local(host.decode() if isinstance(host, bytes) else host):
        _refuse(f"getaddrinfo {host}")
    return _getaddrinfo(host, *args, **kwargs)


def _checked(address, family):
    if family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse(f"connect {address}")


def connect(self, address):
    _checked(address, self.family)
    return _connect(self, address)


def connect_ex(self, address):
    _checked(address, self.family)
    return _connect_ex(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
'''


@dataclass
class Outcome:
    returncode: int
    stderr_lines: list[str]
    stderr: str
    wall_s: float
    cpu_s: float
    network: list[str]
    results_written: list[Path] = field(default_factory=list)


@pytest.fixture
def workspace(tmp_path):
    """Folders, environment and a valid base config; ``cli`` runs a command on a config there."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NETWORK_GUARD)
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{index}.png")
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "HF_", "XAI_TEST"))}
    env |= {
        "HOME": str(home),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "PYTHONPATH": f"{guard}{os.pathsep}{REPO}",
        "XAI_TEST_NETWORK_LOG": str(tmp_path / "network.log"),
    }
    base = {
        "name": "preflight-matrix",
        "device": "cpu",
        "models": [
            {
                "name": "tiny",
                "source": "python",
                "callable": "tests.fixtures.tiny_models:tiny_resnet",
                "class_names": ["cat", "dog", "fox"],
                "preprocess": {"resize": 48, "crop": 48},
            }
        ],
        "images": {"kind": "folder", "root": str(images)},
        "dissect": {"enabled": False},
        "explain": {"methods": ["gradcam"]},
    }

    def cli(command: str, config: dict, extra_env: dict[str, str] | None = None) -> Outcome:
        path = tmp_path / "audit.yaml"
        path.write_text(yaml.safe_dump(config))
        results = tmp_path / "results"
        log = Path(env["XAI_TEST_NETWORK_LOG"])
        log.unlink(missing_ok=True)
        cpu_file = tmp_path / "cpu.txt"
        started = time.monotonic()
        finished = subprocess.run(
            [sys.executable, "-c", CLI, str(cpu_file), command, str(path), "--results", str(results)],
            cwd=tmp_path,
            env=env | (extra_env or {}),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        wall = time.monotonic() - started
        cpu = float(cpu_file.read_text())
        return Outcome(
            finished.returncode,
            [line for line in finished.stderr.splitlines() if line.strip()],
            finished.stderr,
            wall,
            cpu,
            log.read_text().splitlines() if log.exists() else [],
            sorted(results.rglob("*")) if results.exists() else [],
        )

    return {"base": base, "cli": cli, "tmp": tmp_path, "images": images}


def _broken(base: dict, change) -> dict:
    config = yaml.safe_load(yaml.safe_dump(base))
    change(config)
    return config


def _model(**fields):
    return lambda config: config["models"][0].update(fields)


def _clip(**fields):
    def change(config: dict) -> None:
        config["models"] = [{"name": "demo", "source": "demo"}]  # trained on the world: only the CLIP is wrong
        config["dissect"] = {"methods": ["clip_dissect"], "clip": fields}
        config["explain"] = {"enabled": False}

    return change


def _undecodable(images: Path) -> None:
    for path in images.iterdir():
        path.unlink()
    (images / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)  # a PNG header, then garbage
    (images / "empty.jpg").write_bytes(b"")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the block ends


CASES = {
    # item a: CLIP weights not in the caches, by tag and by file
    "clip_tag_not_cached": (
        _clip(model="ViT-B-16", pretrained="openai"),
        "dissect.clip.pretrained",
        ["models--timm--vit_base_patch16_clip_224.openai", "open_clip.create_model_and_transforms"],
    ),
    "clip_file_missing": (
        _clip(model="ViT-B-16", pretrained="/nonexistent/vit-b-16.pt"),
        "dissect.clip.pretrained",
        ["/nonexistent/vit-b-16.pt"],
    ),
    # item b: a callable that cannot be imported, raises when built, or returns no module
    "callable_not_importable": (
        _model(callable="tests.fixtures.tiny_models:no_such_factory"),
        "models.0.callable",
        ["cannot import", "no_such_factory"],
    ),
    "callable_raises": (
        _model(callable="tests.fixtures.tiny_models:broken_factory"),
        "models.0.callable",
        ["FileNotFoundError", "weights/classifier.pt"],
    ),
    "callable_returns_no_module": (
        _model(callable="tests.fixtures.tiny_models:not_a_module"),
        "models.0.callable",
        ["str", "not a torch.nn.Module"],
    ),
    # item c: 3 logits, 4 class names
    "output_width": (
        _model(class_names=["cat", "dog", "fox", "owl"]),
        "models.0.class_names",
        ["[1, 3]", "[1, 4]"],
    ),
    # item d: layers the model lacks
    "cam_layer_unknown": (_model(cam_layer="layer5"), "models.0.cam_layer", ["'layer5'", "layer4"]),
    "dissect_layer_unknown": (_model(layers=["layer4.9"]), "models.0.layers", ["'layer4.9'"]),
    # item f (e needs the images changed, below)
    "prefect_api_unreachable": (None, "PREFECT_API_URL", ["not reachable"]),
    # point 5: a photo classifier labelled on the synthetic world
    "synthetic_probe": (
        lambda config: config.update(dissect={"enabled": True}),
        "dissect.probe",
        ["tiny was not trained on the synthetic world", "dissect.enabled: false", "dissect.allow_synthetic"],
    ),
    "images_undecodable": (None, "images", ["none of the 2 image(s)", "decodes"]),
}


def test_the_base_config_of_the_matrix_is_valid_offline(workspace):
    """The control: every refusal below comes from the one item its case breaks."""
    outcome = workspace["cli"]("validate", workspace["base"])
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.network == []
    allowed = _broken(
        workspace["base"], lambda config: config.update(dissect={"enabled": True, "allow_synthetic": True})
    )
    outcome = workspace["cli"]("validate", allowed)
    assert outcome.returncode == 0, outcome.stderr


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_that_would_fail_is_refused_before_any_work_with_one_line(workspace, case, command):
    change, field_path, fragments = CASES[case]
    extra_env = {}
    if case == "prefect_api_unreachable":
        url = f"http://127.0.0.1:{_closed_port()}/api"
        extra_env, fragments = {"PREFECT_API_URL": url}, [*fragments, url]
    if case == "images_undecodable":
        _undecodable(workspace["images"])
    config = _broken(workspace["base"], change) if change else workspace["base"]

    outcome = workspace["cli"](command, config, extra_env)

    assert outcome.returncode == 2, outcome.stderr
    assert len(outcome.stderr_lines) == 1, outcome.stderr
    line = outcome.stderr_lines[0]
    assert f"{field_path}:" in line or f"({field_path})" in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert "Traceback" not in outcome.stderr and "Error logging to API" not in outcome.stderr
    assert outcome.network == [], outcome.network
    assert outcome.results_written == [], outcome.results_written
    assert outcome.cpu_s < ACCEPTED_CPU_S, f"{command} took {outcome.cpu_s:.1f} CPU s ({outcome.wall_s:.1f} s wall)"


def test_the_network_guard_records_and_refuses_connections_beyond_loopback(workspace):
    """The guard the matrix relies on is real: an outside address is refused and recorded, loopback is not."""
    probe = (
        "import socket\n"
        "server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen()\n"
        "socket.create_connection(server.getsockname(), timeout=5).close()\n"
        "try:\n    socket.create_connection(('192.0.2.1', 443), timeout=5)\nexcept OSError as error:\n"
        "    print('refused', error.errno)\n"
        "try:\n    socket.getaddrinfo('huggingface.co', 443)\n"
        "except OSError as error:\n    print('refused', error.errno)\n"
    )
    log = workspace["tmp"] / "guard-check.log"
    env = {**os.environ, "PYTHONPATH": str(workspace["tmp"] / "guard"), "XAI_TEST_NETWORK_LOG": str(log)}
    finished = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert finished.stdout.split("\n")[:2] == ["refused 101", "refused 101"], finished.stderr
    recorded = log.read_text()
    assert "192.0.2.1" in recorded and "huggingface.co" in recorded and "127.0.0.1" not in recorded


def test_world_concepts_for_a_model_not_trained_on_the_world_name_dissect_concepts(tmp_path):
    """A Broden probe set of one's own with the world's concept list is still refused, at dissect.concepts."""
    base = {
        "models": [{"name": "photo", "source": "python", "callable": "m:build", "num_classes": 2}],
        "dissect": {"methods": ["clip_dissect"], "probe": {"kind": "broden", "root": str(tmp_path)}},
    }
    problems = list(synthetic_probe_problems(parse_config(base)))
    assert [field_path for field_path, _ in problems] == ["dissect.concepts"]
    base["dissect"]["concepts"] = {"source": "broden"}
    assert list(synthetic_probe_problems(parse_config(base))) == []
    demo = {"dissect": {"methods": ["clip_dissect"]}}  # the demo model learnt the world: nothing to refuse
    assert list(synthetic_probe_problems(parse_config(demo))) == []
