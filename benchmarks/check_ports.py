"""Check the project's plain-torch ports of the FID Inception-v3 and of LPIPS against the reference
packages (``pytorch-fid`` and ``lpips``) on identical random weights.

The reference packages need torchvision, which does not import beside the project's CPU torch, so
this script runs in a separate virtual environment that has torch + torchvision + pytorch-fid +
lpips (nothing is downloaded: every network is built with random weights)::

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/refvenv/bin/pip install pytorch-fid lpips numpy scipy
    /work/refvenv/bin/python benchmarks/check_ports.py            # from the repo root

For each network: seed torch, build the reference with random weights (its own random init, and a
second time with every parameter and BatchNorm statistic re-drawn so that no layer is an identity
and activations stay O(1) through the depth), copy its state dict into our port through the
project's own loaders (every tensor of either side must be covered: asserted), run both on the same
random uint8 images, each through its own API's preprocessing, and compare the outputs. Writes
``benchmarks/results/ports.md``; exits non-zero if a comparison is off by more than ``--rtol``
(norm-wise relative difference), or if a key is left out.

Only ``trainers.metrics.inception`` and ``trainers.metrics.lpips`` (and the three small modules they
import) are loaded from the working tree: the ``trainers`` / ``trainers.metrics`` package
``__init__`` files are bypassed with bare package stubs so nothing else of the project is imported.
The project is not installed in that venv, and it need not be on its import path either (no
``PYTHONPATH``, no ``sys.path`` edit): the stubs' ``__path__`` point at this file's working tree,
so the two ports and their imports resolve there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import importlib
import importlib.metadata as md
import platform
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
OUT_MD = REPO / "benchmarks" / "results" / "ports.md"


# --------------------------------------------------------------------------------------------------
# our ports, imported from the working tree without running the package __init__ files
# --------------------------------------------------------------------------------------------------
def import_ports():
    for name, path in (("trainers", REPO / "trainers"), ("trainers.metrics", REPO / "trainers" / "metrics")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]  # a namespace-like stub: submodules import, __init__ does not run
            pkg.__package__ = name
            sys.modules[name] = pkg
    inception = importlib.import_module("trainers.metrics.inception")
    lp = importlib.import_module("trainers.metrics.lpips")
    loaded = sorted(m for m in sys.modules if m.startswith("trainers"))
    allowed = {
        "trainers", "trainers.metrics", "trainers.metrics.inception", "trainers.metrics.lpips",
        "trainers.metrics._images", "trainers.metrics.extractor", "trainers.metrics.weights",
    }
    extra = set(loaded) - allowed
    assert not extra, f"project modules beyond the two ports were imported: {sorted(extra)}"
    return inception, lp, loaded


# --------------------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------------------
def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    ours, ref = ours.detach().double().flatten(), ref.detach().double().flatten()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    d = (ours - ref).abs()
    scale = ref.abs().max().item()
    # element-wise relative difference over the elements that are not ~0 (ReLU/avg-pool features
    # can be exactly 0, where a relative difference means nothing)
    mask = ref.abs() > 1e-3 * scale
    elem_rel = (d[mask] / ref.abs()[mask]).max().item() if mask.any() else 0.0
    return {
        "max_abs": d.max().item(),
        "ref_scale": scale,
        "norm_rel": d.max().item() / scale if scale > 0 else float("inf"),
        "elem_rel": elem_rel,
        "bitwise": bool(torch.equal(ours, ref)),
        "n": ours.numel(),
    }


def perturb_(model: nn.Module, gen: torch.Generator) -> None:
    """Re-draw every parameter and BatchNorm statistic (seeded): He-normal convs (fan-in, so that
    activations neither vanish nor explode over ~50 layers), small random biases, BN affine and
    running statistics away from the identity (weight/var in [0.5, 1.5], bias/mean in [-0.2, 0.2])."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_((torch.rand(m.bias.shape, generator=gen) - 0.5) * 0.2)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_((torch.rand(m.bias.shape, generator=gen) - 0.5) * 0.4)
                m.running_mean.copy_((torch.rand(m.running_mean.shape, generator=gen) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.01)
                m.bias.zero_()


def assert_same_tensors(ours: dict, src: dict, mapping: dict, what: str) -> None:
    """Every tensor of our state dict came from the reference (bitwise), and every reference tensor
    was used: ``mapping`` maps reference keys to our keys."""
    ours_keys = set(ours)
    mapped = set(mapping.values())
    assert mapped == ours_keys, (
        f"{what}: our keys not covered {sorted(ours_keys - mapped)[:8]}, "
        f"mapped to nothing of ours {sorted(mapped - ours_keys)[:8]}"
    )
    for rk, ok in mapping.items():
        assert torch.equal(ours[ok].cpu(), src[rk].cpu()), f"{what}: {rk} -> {ok} differs after loading"


# --------------------------------------------------------------------------------------------------
# pytorch-fid InceptionV3([3]) with random weights
# --------------------------------------------------------------------------------------------------
_NO_DOWNLOAD = object()


@contextlib.contextmanager
def fid_inception_without_download():
    """``pytorch_fid.inception.fid_inception_v3`` builds torchvision's Inception3 (random init,
    ``init_weights=False``), patches in the FID blocks, then loads the checkpoint from the URL. Here
    the download returns a sentinel and Inception3.load_state_dict ignores exactly that sentinel,
    so the architecture is pytorch-fid's own, unmodified, with its random initial weights."""
    import pytorch_fid.inception as pfi
    import torchvision.models.inception as tvi

    def fake_download(url, *a, **k):
        assert url == pfi.FID_WEIGHTS_URL, url
        return _NO_DOWNLOAD

    orig_load = tvi.Inception3.load_state_dict

    def load(self, state_dict, *a, **k):
        if state_dict is _NO_DOWNLOAD:
            return None
        return orig_load(self, state_dict, *a, **k)

    saved = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = fake_download
    tvi.Inception3.load_state_dict = load
    try:
        yield pfi
    finally:
        pfi.load_state_dict_from_url = saved
        tvi.Inception3.load_state_dict = orig_load


# InceptionV3's blocks Sequential -> the checkpoint's module names (pytorch_fid.inception.InceptionV3)
_FID_BLOCKS = {
    0: {0: "Conv2d_1a_3x3", 1: "Conv2d_2a_3x3", 2: "Conv2d_2b_3x3"},  # 3: MaxPool
    1: {0: "Conv2d_3b_1x1", 1: "Conv2d_4a_3x3"},  # 2: MaxPool
    2: {i: f"Mixed_{n}" for i, n in enumerate(["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"])},
    3: {0: "Mixed_7a", 1: "Mixed_7b", 2: "Mixed_7c"},  # 3: AdaptiveAvgPool2d
}


def fid_key(ref_key: str) -> str:
    """``blocks.2.4.branch1x1.conv.weight`` -> ``Mixed_6b.branch1x1.conv.weight``."""
    _, b, i, rest = ref_key.split(".", 3)
    return f"{_FID_BLOCKS[int(b)][int(i)]}.{rest}"


def check_inception(ports, seed: int, sizes, n_images: int, perturb: bool, rows: list, failures: list, rtol: float,
                    mutate=None, label: str = ""):
    inception_mod = ports[0]
    torch.manual_seed(seed)
    with fid_inception_without_download() as pfi:
        ref = pfi.InceptionV3([3], resize_input=True, normalize_input=True)
    ref.eval()
    if perturb:
        perturb_(ref, torch.Generator().manual_seed(seed + 1))
    ref_sd = ref.state_dict()
    # the checkpoint layout pytorch-fid loads (torchvision Inception3 names + a 1008-class fc that
    # InceptionV3 drops): feed that to our loader, fc included, as the real file would be
    ckpt = {fid_key(k): v.clone() for k, v in ref_sd.items()}
    ckpt["fc.weight"] = torch.randn(1008, 2048)
    ckpt["fc.bias"] = torch.randn(1008)
    ours = inception_mod.InceptionExtractor(batch_size=n_images)
    ours.net.load_fid_state_dict(ckpt, source="reference")
    assert_same_tensors(
        ours.net.state_dict(), ref_sd, {k: fid_key(k) for k in ref_sd}, "inception"
    )
    init = "perturbed" if perturb else "default"
    gen = torch.Generator().manual_seed(seed + 2)
    for hw in sizes:
        imgs = torch.randint(0, 256, (n_images, 3, hw, hw), dtype=torch.uint8, generator=gen)
        with torch.no_grad(), (mutate(ours) if mutate else contextlib.nullcontext()):
            a = ours.features(imgs)  # project API: uint8 [N,3,H,W]
        with torch.no_grad():
            b = ref(imgs.float().div(255.0))[0].flatten(1)  # pytorch-fid API: floats in [0, 1]
        assert a.shape == b.shape == (n_images, 2048), (a.shape, b.shape)
        c = compare(a, b)
        rows.append({"net": "FID Inception-v3 pool3 (2048-d)", "init": init, "size": f"{hw}x{hw}",
                     "what": label or f"{n_images} images x 2048 features", **c})
        if mutate is None and not c["norm_rel"] < rtol:
            failures.append(f"inception {init} {hw}x{hw}: norm-wise rel {c['norm_rel']:.3g}")
        if mutate is not None and c["norm_rel"] < rtol:
            failures.append(f"negative control not detected: inception {label} {hw}x{hw}")


# --------------------------------------------------------------------------------------------------
# lpips.LPIPS(net=vgg|alex) with random trunk and random lin layers
# --------------------------------------------------------------------------------------------------
def lpips_key(ref_key: str) -> str | None:
    """Reference key -> the key our loaders take: ``net.sliceK.<i>.<p>`` -> torchvision's
    ``features.<i>.<p>`` (the slices keep torchvision's indices); ``lin{l}.model.1.weight`` stays;
    ``lins.{l}.*`` (the same modules again through the ModuleList) and the scaling layer's buffers
    are handled separately (None)."""
    if ref_key.startswith("net.slice"):
        _, _, i, p = ref_key.split(".")
        return f"features.{i}.{p}"
    if ref_key.startswith("lin"):
        return None if ref_key.startswith("lins.") else ref_key
    if ref_key.startswith("scaling_layer."):
        return None
    raise KeyError(ref_key)


def check_lpips(ports, net: str, seed: int, sizes, n_pairs: int, perturb: bool, rows: list, failures: list, rtol: float,
                mutate=None, label: str = ""):
    import lpips as ref_lpips

    lp_mod = ports[1]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation warnings
        # pretrained=False: random lin layers; pnet_rand=True: random trunk (no ImageNet download);
        # lpips=True: the lin layers are used; version 0.1 (scaling layer on)
        ref = ref_lpips.LPIPS(pretrained=False, net=net, version="0.1", lpips=True, pnet_rand=True,
                              verbose=False)
    ref.eval()
    if perturb:
        perturb_(ref.net, torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():  # lpips' lin weights are non-negative in the released files
            g = torch.Generator().manual_seed(seed + 3)
            for lin in ref.lins:
                w = lin.model[1].weight
                w.copy_(torch.rand(w.shape, generator=g) / w.shape[1])
    ref_sd = ref.state_dict()
    backbone_sd, lin_sd, mapping = {}, {}, {}
    for k, v in ref_sd.items():
        ok = lpips_key(k)
        if ok is None:
            continue
        (backbone_sd if ok.startswith("features.") else lin_sd)[ok] = v.clone()
    # the lins.* duplicates must be the very same tensors as lin{l}.*
    for k, v in ref_sd.items():
        if k.startswith("lins."):
            _, l, rest = k.split(".", 2)
            assert torch.equal(v, ref_sd[f"lin{l}.{rest}"]), k
    ours = lp_mod.LPIPS(net, batch_size=n_pairs)
    ours.load_backbone(backbone_sd, source="reference")
    ours.load_lins(lin_sd, source="reference")
    for k in ref_sd:
        ok = lpips_key(k)
        if ok is None:
            continue
        if ok.startswith("features."):
            mapping[k] = "backbone." + ok
        else:  # lin{l}.model.1.weight -> lins.{l}.model.1.weight
            mapping[k] = "lins." + ok[3:]
    assert_same_tensors(ours.state_dict(), ref_sd, mapping, f"lpips-{net}")
    # the scaling layer: ours keeps it as non-persistent buffers, compare the values
    assert torch.equal(ours.shift, ref.scaling_layer.shift), "ScalingLayer shift differs"
    assert torch.equal(ours.scale, ref.scaling_layer.scale), "ScalingLayer scale differs"
    init = "perturbed" if perturb else "default"
    gen = torch.Generator().manual_seed(seed + 2)
    for hw in sizes:
        x = torch.randint(0, 256, (n_pairs, 3, hw, hw), dtype=torch.uint8, generator=gen)
        y = torch.randint(0, 256, (n_pairs, 3, hw, hw), dtype=torch.uint8, generator=gen)
        with torch.no_grad(), (mutate(ours) if mutate else contextlib.nullcontext()):
            a = ours(x, y)  # project API: uint8 [N,3,H,W] (-> x / 127.5 - 1 inside)
            # and a second path: the float input of our API (same tensor the reference gets)
            a_f = ours(x.float().div(127.5).sub(1.0), y.float().div(127.5).sub(1.0))
        with torch.no_grad():
            # lpips API: floats in [-1, 1], converted exactly as our to_signed does
            b = ref(x.float().div(127.5).sub(1.0), y.float().div(127.5).sub(1.0)).flatten()
        assert torch.equal(a, a_f), "our LPIPS gives different values for uint8 and the same [-1,1] floats"
        c = compare(a, b)
        rows.append({"net": f"LPIPS-{net} (v0.1)", "init": init, "size": f"{hw}x{hw}",
                     "what": label or f"{n_pairs} pair distances", **c})
        if mutate is None and not c["norm_rel"] < rtol:
            failures.append(f"lpips-{net} {init} {hw}x{hw}: norm-wise rel {c['norm_rel']:.3g}")
        if mutate is not None and c["norm_rel"] < rtol:
            failures.append(f"negative control not detected: lpips-{net} {label} {hw}x{hw}")


# --------------------------------------------------------------------------------------------------
# negative controls: deliberate, in-memory-only mutations of our port that the check must catch
# --------------------------------------------------------------------------------------------------
class _FunctionalProxy:
    """Stands in for ``torch.nn.functional`` inside one of our modules only (the reference keeps
    the real one), with some functions overridden."""

    def __init__(self, **overrides):
        self._over = overrides

    def __getattr__(self, name):
        return self._over.get(name, getattr(torch.nn.functional, name))


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def inception_controls(inception_mod):
    F = torch.nn.functional

    def torchvision_avgpool(ours):  # torchvision's InceptionA/C/E convention: padding counted
        return _patched(inception_mod, "_avg3", lambda x: F.avg_pool2d(x, 3, stride=1, padding=1))

    def mixed7c_avg(ours):  # the TF graph's max pool in Mixed_7c replaced by an avg pool
        return _patched(ours.net.Mixed_7c, "pool", "avg")

    @contextlib.contextmanager
    def bn_eps_1e5(ours):  # torch's default BN eps instead of the TF graph's 1e-3
        bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.eps = 1e-5
        try:
            yield
        finally:
            for m in bns:
                m.eps = 1e-3

    def resize_align_corners(ours):  # bilinear resize with align_corners=True
        interp = lambda x, **k: F.interpolate(x, **{**k, "align_corners": True})  # noqa: E731
        return _patched(inception_mod, "F", _FunctionalProxy(interpolate=interp))

    return [
        ("CONTROL: avg pool counting padding (torchvision)", torchvision_avgpool),
        ("CONTROL: Mixed_7c avg pool instead of max", mixed7c_avg),
        ("CONTROL: BatchNorm eps 1e-5 instead of 1e-3", bn_eps_1e5),
        ("CONTROL: resize align_corners=True", resize_align_corners),
    ]


def lpips_controls():
    @contextlib.contextmanager
    def no_scaling(ours):  # lpips v0.0 convention: no ScalingLayer
        s, c = ours.shift.clone(), ours.scale.clone()
        ours.shift.zero_()
        ours.scale.fill_(1.0)
        try:
            yield
        finally:
            ours.shift.copy_(s)
            ours.scale.copy_(c)

    def pre_relu_taps(ours):  # features taken at the convs, before their ReLU
        return _patched(ours.backbone, "taps", tuple(t - 1 for t in ours.backbone.taps))

    return [
        ("CONTROL: no ScalingLayer (v0.0)", no_scaling),
        ("CONTROL: taps before the ReLU", pre_relu_taps),
    ]


# --------------------------------------------------------------------------------------------------
# weight files shipped by the installed packages
# --------------------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".onnx", ".bin", ".h5", ".pb", ".tflite")


def shipped_weight_files() -> list[tuple[str, Path]]:
    """Weight-like files in the distributions of the reference stack (lpips, pytorch-fid,
    torchvision, torch)."""
    out = []
    for dist in ("lpips", "pytorch-fid", "torchvision", "torch"):
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            continue
        for f in files:
            if str(f).endswith(WEIGHT_SUFFIXES):
                p = Path(f.locate())
                if p.is_file():
                    out.append((dist, p))
    return out


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lin_file_summary(p: Path, lp_mod) -> str:
    """Keys/shapes of an lpips lin file, and whether our loader (weights_only=True) takes it."""
    from trainers.metrics.weights import load_state_dict_file

    sd = load_state_dict_file(p)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sd.items())
    net = p.stem
    note = ""
    if net in ("vgg", "alex") and p.parent.name == "v0.1":
        m = lp_mod.LPIPS(net)
        m.load_lins(sd, source=str(p))
        ok = all(torch.equal(m.lins[i].model[1].weight, sd[f"lin{i}.model.1.weight"]) for i in range(5))
        nonneg = all((v >= 0).all().item() for v in sd.values())
        note = f"; loads into our LPIPS('{net}').load_lins: {'yes' if ok else 'NO'}; all weights >= 0: {nonneg}"
    return shapes + note


# --------------------------------------------------------------------------------------------------
def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--n-images", type=int, default=4, help="images per size for Inception")
    ap.add_argument("--n-pairs", type=int, default=6, help="image pairs per size for LPIPS")
    ap.add_argument("--rtol", type=float, default=1e-4, help="pass: max|ours-ref| / max|ref| below this")
    ap.add_argument("--out", type=Path, default=OUT_MD)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ports = import_ports()
    rows: list[dict] = []
    failures: list[str] = []
    for perturb in (False, True):
        check_inception(ports, args.seed, (32, 64, 299), args.n_images, perturb, rows, failures, args.rtol)
        for net in ("vgg", "alex"):
            check_lpips(ports, net, args.seed, (32, 64), args.n_pairs, perturb, rows, failures, args.rtol)
    # negative controls (perturbed weights, one size each): each must be detected
    for label, mutate in inception_controls(ports[0]):
        check_inception(ports, args.seed, (64,), 2, True, rows, failures, args.rtol, mutate, label)
    for net in ("vgg", "alex"):
        for label, mutate in lpips_controls():
            check_lpips(ports, net, args.seed, (64,), args.n_pairs, True, rows, failures, args.rtol, mutate, label)

    head = ("| network | init | input | compared | max abs diff | max abs ref | max diff / max abs ref "
            "| max elementwise rel diff | bitwise equal |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['init']} | {r['size']} | {r['what']} | {fmt(r['max_abs'])} | "
            f"{r['ref_scale']:.4g} | {fmt(r['norm_rel'])} | {fmt(r['elem_rel'])} | {'yes' if r['bitwise'] else 'no'} |"
        )
    table = "\n".join(lines)
    print(table)

    weights = shipped_weight_files()
    wlines = ["| package | file | bytes | sha256 |", "|---|---|---|---|"]
    details = []
    for dist, p in weights:
        rel = Path(*p.parts[p.parts.index("site-packages") + 1 :])
        wlines.append(f"| {dist} | `{rel}` | {p.stat().st_size} | `{sha256(p)}` |")
        if dist == "lpips":
            details.append(f"- `{rel}`: {lin_file_summary(p, ports[1])}")
    wtable = "\n".join(wlines)
    print()
    print(wtable)

    def ver(d):
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            return "not installed"

    import torchvision

    cmd = "cd /work/main && nice -n 10 /work/refvenv/bin/python benchmarks/check_ports.py"
    if sys.argv[1:]:
        cmd += " " + " ".join(sys.argv[1:])
    status = "PASS" if not failures else "FAIL: " + "; ".join(failures)
    md_text = f"""# Ports vs reference packages (identical random weights)

- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
- command: `{cmd}`
- environment: separate venv `{sys.prefix}` (Python {platform.python_version()}, {platform.machine()}),
  torch {torch.__version__}, torchvision {torchvision.__version__}, pytorch-fid {ver('pytorch-fid')},
  lpips {ver('lpips')}, numpy {ver('numpy')}; CPU, {args.threads} thread(s), float32
- project modules imported (package `__init__` files bypassed): {', '.join(ports[2])}
- result: **{status}** (criterion: max |ours - ref| / max |ref| < {args.rtol:g} for every row that is
  not a CONTROL, and at least that for every CONTROL row)

## What was compared

- **FID Inception**: `pytorch_fid.inception.InceptionV3([3], resize_input=True, normalize_input=True)`
  built by pytorch-fid's own `fid_inception_v3()` with the checkpoint download stubbed out (the URL
  fetch returns a sentinel that `Inception3.load_state_dict` ignores), so the weights are
  torchvision's random init (`init_weights=False`, as pytorch-fid builds it). Its state dict, mapped
  to the checkpoint names (`blocks.2.4.*` -> `Mixed_6b.*`, ...) plus a random 1008-class `fc.*`,
  goes through our `FIDInceptionV3.load_fid_state_dict`; every tensor of both sides is matched
  (asserted, bitwise). Inputs: the same uint8 images; ours gets them as uint8 `[N,3,H,W]` through
  `InceptionExtractor.features`, pytorch-fid gets `uint8 / 255.0` (both then bilinear-resize to
  299x299 with `align_corners=False` and scale to [-1, 1]). Output: the 2048-d pool3 features.
- **LPIPS**: `lpips.LPIPS(pretrained=False, net=..., version='0.1', lpips=True, pnet_rand=True)`
  (random torchvision trunk, random lin layers, eval mode so the lin Dropout is off). Its trunk
  (`net.sliceK.<i>.*` -> torchvision `features.<i>.*`) and lin weights (`lin{{l}}.model.1.weight`)
  go through our `LPIPS.load_backbone` / `load_lins`; every tensor matched (asserted), the
  ScalingLayer constants compared too. Inputs: ours gets uint8 pairs, lpips gets
  `uint8 / 127.5 - 1` (exactly what our `to_signed` computes; our float path is checked to give the
  same values bitwise). Output: one distance per pair (no resizing on either side).
- **init**: `default` = the reference's own random init as constructed; `perturbed` = every conv
  weight re-drawn He-normal (fan-in) with small random biases, every BatchNorm weight/bias/running
  mean/running var re-drawn away from the identity, LPIPS lin weights re-drawn non-negative — so
  that a wrong BN eps, a skipped layer or a pooling/padding mismatch cannot hide behind identity BN
  statistics or vanishing activations.
- **CONTROL rows** (negative controls): our port deliberately mutated in memory only (pytorch-fid /
  torchvision conventions it must *not* follow: avg pool counting padding, avg instead of max pool in
  Mixed_7c, BN eps 1e-5, `align_corners=True` resize; for LPIPS no ScalingLayer, taps before the
  ReLU), perturbed weights, one size: each must show a difference above the criterion, which shows
  the comparison is sensitive to exactly the conventions that matter.
- columns: *max elementwise rel diff* is over elements with |ref| > 1e-3 max |ref|.

## Results

{table}

## Weight files shipped by the installed packages

Only `lpips` ships weight files (its lin layers); torch, torchvision and pytorch-fid ship none
(their backbones are downloaded on first use, which this check never does).

{wtable}

Contents:
{chr(10).join(details)}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md_text)
    print(f"\n{status}\nwrote {args.out}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
