"""Metric weights fetch themselves on first use, with hash checks — tested against a loopback HTTP
server that serves files this test generates (never the internet); offline, the clear error."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from trainers.metrics import weights
from trainers.metrics.weights import MissingWeightsError, RemoteWeight, WeightHashError


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path):
    monkeypatch.setenv("ORCHESTRATE_OFFLINE", "0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ORCHESTRATE_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def serve(root: Path, name: str, state: dict) -> str:
    torch.save(state, root / name)
    return hashlib.sha256((root / name).read_bytes()).hexdigest()


def test_inception_weights_are_fetched_once_and_checked(server, online, monkeypatch):
    from trainers.metrics.inception import FID_WEIGHTS_FILE, FIDInceptionV3, InceptionExtractor

    root, url = server
    net = FIDInceptionV3()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # pytorch-fid's file has fc
    digest = serve(root, "inc.pth", state)
    monkeypatch.setitem(weights.REMOTE, FID_WEIGHTS_FILE, RemoteWeight(f"{url}/inc.pth", digest))
    ext = InceptionExtractor.from_pretrained()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    assert cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == digest
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    loaded = dict(ext.net.named_parameters())
    assert torch.equal(loaded[key], state[key])  # the served weights, not a random init
    (root / "inc.pth").unlink()  # second use: from the cache, no request
    InceptionExtractor.from_pretrained()


def test_lpips_backbone_and_lin_layers_are_fetched(server, online, monkeypatch):
    from trainers.metrics.lpips import LPIPS

    root, url = server
    probe = LPIPS("alex")
    bfile, lfile = LPIPS.weight_files("alex")
    backbone = {k[len("backbone."):]: v for k, v in probe.state_dict().items() if k.startswith("backbone.")}
    # the lpips package's file format: lin{l}.model.1.weight
    lins = {f"lin{k.split('.')[1]}.model.1.weight": v.abs() for k, v in probe.state_dict().items()
            if k.startswith("lins.")}
    b_digest = serve(root, bfile, backbone)  # torchvision's key names (features.N.*)
    l_digest = serve(root, lfile, lins)
    monkeypatch.setitem(weights.REMOTE, bfile, RemoteWeight(f"{url}/{bfile}", b_digest[:8]))
    monkeypatch.setitem(weights.REMOTE, lfile, RemoteWeight(f"{url}/{lfile}", l_digest, f"lpips-v0.1-{lfile}"))
    model = LPIPS.from_pretrained("alex")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert model(x, x.flip(-1)).shape == (2,)


def test_a_download_with_the_wrong_hash_is_refused_and_deleted(server, online, monkeypatch):
    from trainers.metrics.inception import FID_WEIGHTS_FILE, InceptionExtractor

    root, url = server
    (root / "bad.pth").write_bytes(b"not the weights")
    monkeypatch.setitem(weights.REMOTE, FID_WEIGHTS_FILE, RemoteWeight(f"{url}/bad.pth", "0" * 64))
    with pytest.raises(WeightHashError, match="does not match"):
        InceptionExtractor.from_pretrained()
    assert not list((Path(torch.hub.get_dir()) / "checkpoints").glob("*inception*"))


def test_offline_gives_the_clear_error_naming_the_file(server, online, monkeypatch):
    from trainers.metrics.inception import FID_WEIGHTS_FILE, InceptionExtractor

    root, url = server
    monkeypatch.setitem(weights.REMOTE, FID_WEIGHTS_FILE, RemoteWeight(f"{url}/never-requested.pth", "0" * 8))
    monkeypatch.setenv("ORCHESTRATE_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        InceptionExtractor.from_pretrained()
    text = str(err.value)
    assert FID_WEIGHTS_FILE in text and "searched" in text and "offline" in text


def test_unreachable_address_is_reported_not_hung(online, monkeypatch):
    from trainers.metrics.inception import FID_WEIGHTS_FILE, InceptionExtractor

    monkeypatch.setitem(weights.REMOTE, FID_WEIGHTS_FILE, RemoteWeight("http://127.0.0.1:1/x.pth", "0" * 8))
    with pytest.raises(MissingWeightsError, match="could not download"):
        InceptionExtractor.from_pretrained()
