"""Tests of trainers.data: the synthetic domains and the image loaders (folder, parquet, S3, cache)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainers.data import (DOMAINS, TARGET_DOMAINS, DataError, load_images, render, to_tensor)
from trainers.data import sources, synthetic

# ---------------------------------------------------------------------------------------------
# synthetic domains


def test_domain_lists():
    assert DOMAINS[0] == "source" and len(TARGET_DOMAINS) >= 5
    assert set(TARGET_DOMAINS) == set(DOMAINS) - {"source"}


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_deterministic_and_seeded(domain):
    a = render(domain, 6, 24, seed=3)
    assert a.dtype == np.uint8 and a.shape == (6, 24, 24, 3)
    assert a.tobytes() == render(domain, 6, 24, seed=3).tobytes()
    assert not np.array_equal(a, render(domain, 6, 24, seed=4))
    # image i depends only on (domain, seed, start + i): offsets and chunking do not matter
    np.testing.assert_array_equal(render(domain, 5, 24, seed=3, start=3), render(domain, 8, 24, seed=3)[3:])
    assert a.std() > 5, "a domain renders flat images"


def test_render_chunk_boundaries_do_not_matter():
    # at 256² one chunk holds four images; start=3 makes chunks straddle differently
    np.testing.assert_array_equal(render("source", 6, 256, start=3), render("source", 9, 256)[3:])


def test_render_rejects_unknown_domain_and_bad_sizes():
    with pytest.raises(ValueError, match=r"'faces'.*source.*sketch.*pastel"):
        render("faces", 2, 16)
    with pytest.raises(ValueError):
        render("source", -1, 16)
    with pytest.raises(ValueError):
        render("source", 2, 0)
    assert render("night", 0, 16).shape == (0, 16, 16, 3)


def test_source_domain_is_varied():
    images = render("source", 1000, 16)
    assert len({img.tobytes() for img in images}) == 1000
    # not just tiny perturbations: typical pairs differ a lot
    flat = images.reshape(1000, -1).astype(np.float32)
    d = np.abs(flat[:500] - flat[500:]).mean(axis=1)
    assert np.median(d) > 30


def test_domain_styles_have_their_signatures():
    n = 64
    sketch = render("sketch", n, 32).astype(int)
    assert (sketch[..., 0] == sketch[..., 1]).all() and (sketch[..., 1] == sketch[..., 2]).all()
    assert np.median(sketch) > 200  # pencil on white paper
    night = render("night", n, 32).astype(int)
    assert np.median(night) < 40  # dark sky
    assert (night.max(axis=(1, 2, 3)) > 200).all()  # glowing shapes
    pastel = render("pastel", n, 32).astype(int)
    assert pastel.min() > 120  # pale: nothing dark
    assert (pastel.max(-1) - pastel.min(-1)).mean() < 40  # low saturation
    mosaic = render("mosaic", n, 32).reshape(n, -1, 3)
    palette = np.round(synthetic._MOSAIC_PALETTE * 255).astype(int)
    distance = np.abs(mosaic[:, :, None, :].astype(int) - palette).max(-1).min(-1)
    assert (distance == 0).all()  # a limited palette: every pixel is a palette colour
    assert max(len(np.unique(img, axis=0)) for img in mosaic) <= len(palette)


def _colour_features(images: np.ndarray) -> np.ndarray:
    """Per-image colour statistics: value / saturation / gradient histograms, the number of
    distinct colours and the share of the most common colour."""
    a = images.astype(np.int64)
    size = a.shape[1] * a.shape[2]

    def hist(values, bins):
        return np.stack([np.histogram(v, bins=bins)[0] for v in values]) / size

    value = a.max(-1)
    sat = value - a.min(-1)
    grad = np.abs(np.diff(a.sum(-1), axis=2))
    packed = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
    counts = [np.unique(p, return_counts=True)[1] for p in packed]
    distinct = np.log([len(c) / size for c in counts])
    mode = np.array([c.max() / size for c in counts])
    return np.concatenate([hist(value, np.linspace(0, 256, 9)), hist(sat, np.linspace(0, 256, 9)),
                           hist(grad, [0, 3, 12, 48, 192, 800]), distinct[:, None], mode[:, None]], 1)


def test_domains_are_separable_by_colour_statistics():
    n = 120
    train = {d: _colour_features(render(d, n, 32, seed=0)) for d in DOMAINS}
    test = {d: _colour_features(render(d, n, 32, seed=1)) for d in DOMAINS}
    pooled = np.concatenate(list(train.values()))
    mu, sd = pooled.mean(0), pooled.std(0) + 1e-3
    centroids = np.stack([((train[d] - mu) / sd).mean(0) for d in DOMAINS])
    x = np.concatenate([(test[d] - mu) / sd for d in DOMAINS])
    y = np.repeat(np.arange(len(DOMAINS)), n)
    pred = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    per_domain = {d: float((pred[y == i] == i).mean()) for i, d in enumerate(DOMAINS)}
    assert (pred == y).mean() > 0.9, per_domain
    assert min(per_domain.values()) > 0.8, per_domain


def _box_down(images: np.ndarray, factor: int) -> np.ndarray:
    n, h, w, c = images.shape
    return images.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float32).mean((2, 4))


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-9)


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_resolution_independent(domain):
    """A 64² render, box-filtered to 16², shows the same scene as the 16² render of that index."""
    big, small = render(domain, 24, 64), render(domain, 24, 16).astype(np.float32)
    down = _box_down(big, 4)
    same = _correlation(down, small)
    other = _correlation(np.roll(down, 1, axis=0), small)
    assert np.median(same) > 0.9, np.median(same)
    assert (same > other + 0.2).all(), (same, other)


# ---------------------------------------------------------------------------------------------
# image folders

COLOURS = [(230, 30, 30), (30, 200, 40), (40, 40, 220), (240, 220, 30), (200, 40, 200),
           (30, 210, 210), (120, 60, 20), (250, 250, 250)]


def _png_bytes(size, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_folder(root: Path) -> list[str]:
    """Eight solid-colour images of different, non-square sizes in nested folders, plus files
    that are not images; returns the relative paths in the expected (sorted) order."""
    rels = []
    for i, colour in enumerate(COLOURS):
        ext = ".jpg" if i == 5 else ".png"
        rel = f"{'ab'[i % 2]}/img{i}{ext}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + 7 * i, 33 - 2 * i), colour).save(path)
        rels.append(rel)
    (root / "README.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"garbage that would fail to decode")
    return sorted(rels)


def _colour_order(images: np.ndarray) -> list[int]:
    """Which of COLOURS each (solid) image shows."""
    means = images.reshape(len(images), -1, 3).mean(1)
    return [int(np.argmin(((np.asarray(COLOURS) - m) ** 2).sum(1))) for m in means]


def test_folder_loads_in_relative_path_order(tmp_path):
    rels = _write_folder(tmp_path)
    images = load_images(str(tmp_path), 16)
    assert images.dtype == np.uint8 and images.shape == (8, 16, 16, 3)
    expected = [int(Path(r).stem[3:]) for r in rels]
    assert _colour_order(images) == expected
    png = [k for k, i in enumerate(expected) if i != 5]
    for k in png:  # lossless sources keep their colour exactly
        assert (images[k] == COLOURS[expected[k]]).all()
    # a Path works as well as a str; a single image file is a source too
    np.testing.assert_array_equal(load_images(tmp_path, 16), images)
    single = load_images(str(tmp_path / rels[0]), 8)
    assert single.shape == (1, 8, 8, 3) and (single == COLOURS[expected[0]]).all()


def test_folder_centre_crops_non_square_images(tmp_path):
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # blue middle third: what the centre crop keeps
    img.save(tmp_path / "wide.png")
    out = load_images(str(tmp_path), 12)
    assert (out[0, :, 1:-1] == (0, 0, 255)).all()


def test_folder_rgba_and_grayscale_become_rgb(tmp_path):
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "a_transparent.png")
    Image.new("L", (10, 10), 77).save(tmp_path / "b_gray.png")
    out = load_images(str(tmp_path), 8)
    assert (out[0] == 255).all()  # transparent -> white
    assert (out[1] == 77).all()


def test_folder_count_selects_a_seeded_subset(tmp_path):
    _write_folder(tmp_path)
    full = load_images(str(tmp_path), 16)
    picked = load_images(str(tmp_path), 16, count=3, seed=1)
    np.testing.assert_array_equal(picked, load_images(str(tmp_path), 16, count=3, seed=1))
    perm = np.random.default_rng(1).permutation(8)
    np.testing.assert_array_equal(picked, full[perm[:3]])
    # smaller counts are prefixes, `start` windows do not overlap, other seeds pick others
    np.testing.assert_array_equal(load_images(str(tmp_path), 16, count=2, seed=1), picked[:2])
    np.testing.assert_array_equal(load_images(str(tmp_path), 16, count=3, seed=1, start=3),
                                  full[perm[3:6]])
    others = [tuple(_colour_order(load_images(str(tmp_path), 16, count=3, seed=s))) for s in range(2, 6)]
    assert any(o != tuple(_colour_order(picked)) for o in others)


def test_folder_too_few_or_no_images(tmp_path):
    _write_folder(tmp_path)
    with pytest.raises(DataError, match=rf"{tmp_path}.*found 8 images.*20"):
        load_images(str(tmp_path), 16, count=20)
    with pytest.raises(DataError, match=r"found 8 images.*6 after skipping start=3"):
        load_images(str(tmp_path), 16, count=6, start=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=rf"{empty}.*no images"):
        load_images(str(empty), 16)
    with pytest.raises(DataError, match="no such file"):
        load_images(str(tmp_path / "missing"), 16)
    with pytest.raises(DataError, match="count"):
        load_images(str(tmp_path), 16, count=0)


def test_corrupt_images_are_named(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), COLOURS[i]).save(good / f"ok{i}.png")
    (good / "zz_garbage.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match="zz_garbage.png"):
        load_images(str(good), 16)
    # only the selected images are decoded: a selection without the bad file loads fine
    seed = next(s for s in range(100) if 5 not in np.random.default_rng(s).permutation(6)[:3])
    assert load_images(str(good), 16, count=3, seed=seed).shape == (3, 16, 16, 3)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(noise).save(data, format="PNG")
    (truncated / "cut.png").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(DataError, match=r"cut\.png.*decode"):
        load_images(str(truncated), 16)


def test_to_tensor():
    images = render("source", 3, 8)
    t = to_tensor(images)
    assert t.shape == (3, 3, 8, 8) and str(t.dtype) == "torch.uint8" and t.is_contiguous()
    assert (t.permute(0, 2, 3, 1).numpy() == images).all()
    with pytest.raises(ValueError):
        to_tensor(images.astype(np.float32))


def test_synthetic_uri():
    np.testing.assert_array_equal(load_images("synthetic:night", 16, count=4, seed=2, start=1),
                                  render("night", 4, 16, seed=2, start=1))
    with pytest.raises(DataError, match="count"):
        load_images("synthetic:night", 16)
    with pytest.raises(DataError, match=r"'dogs'.*synthetic:sketch"):
        load_images("synthetic:dogs", 16, count=2)


# ---------------------------------------------------------------------------------------------
# parquet


def _image_bytes(n: int) -> list[bytes]:
    return [_png_bytes((18 + i, 14), COLOURS[i % len(COLOURS)]) for i in range(n)]


def _write_parquet(path: Path, blobs, *, hf: bool = False, row_group_size: int | None = None):
    if hf:
        column = pa.array([{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(blobs)],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        column = pa.array(blobs, type=pa.binary())
    table = pa.table({"label": pa.array(range(len(blobs)), pa.int64()), "image": column})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_binary_and_hf_struct_columns(tmp_path):
    blobs = _image_bytes(8)
    _write_parquet(tmp_path / "plain.parquet", blobs, row_group_size=3)
    _write_parquet(tmp_path / "hf.parquet", blobs, hf=True)
    plain = load_images(str(tmp_path / "plain.parquet"), 16)
    assert plain.shape == (8, 16, 16, 3) and plain.dtype == np.uint8
    assert _colour_order(plain) == list(range(8))
    np.testing.assert_array_equal(load_images(str(tmp_path / "hf.parquet"), 16), plain)
    # count picks rows across row groups exactly like a folder would
    perm = np.random.default_rng(5).permutation(8)
    np.testing.assert_array_equal(load_images(str(tmp_path / "plain.parquet"), 16, count=4, seed=5),
                                  plain[perm[:4]])


def test_parquet_folder(tmp_path):
    blobs = _image_bytes(8)
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_parquet(folder / "part-0.parquet", blobs[:5])
    _write_parquet(folder / "part-1.parquet", blobs[5:], hf=True)
    _write_parquet(tmp_path / "all.parquet", blobs)
    np.testing.assert_array_equal(load_images(str(folder), 16), load_images(str(tmp_path / "all.parquet"), 16))
    Image.new("RGB", (4, 4)).save(folder / "stray.png")
    with pytest.raises(DataError, match="both image files"):
        load_images(str(folder), 16)


def test_parquet_errors_name_the_column_and_row(tmp_path):
    path = tmp_path / "data.parquet"
    _write_parquet(path, _image_bytes(4))
    with pytest.raises(DataError, match=r"data\.parquet.*'img'.*label, image"):
        load_images(str(path), 16, image_column="img")
    with pytest.raises(DataError, match=r"'label' has type int64"):
        load_images(str(path), 16, image_column="label")

    blobs = _image_bytes(4)
    blobs[2] = b"\x89PNG\r\n\x1a\n broken"
    _write_parquet(tmp_path / "bad.parquet", blobs)
    with pytest.raises(DataError, match=r"bad\.parquet row 2"):
        load_images(str(tmp_path / "bad.parquet"), 16)
    blobs[2] = b""
    _write_parquet(tmp_path / "empty_row.parquet", blobs, hf=True)
    with pytest.raises(DataError, match=r"empty_row\.parquet row 2.*empty"):
        load_images(str(tmp_path / "empty_row.parquet"), 16)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet.*parquet"):
        load_images(str(tmp_path / "junk.parquet"), 16)


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    _write_folder(data)
    first = load_images(str(data), 16, count=4, seed=2, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob(".tmp-*"))

    real_decode = sources._decode
    calls = []

    def counting_decode(*args, **kwargs):
        calls.append(args[1])
        return real_decode(*args, **kwargs)

    def failing_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the images")

    monkeypatch.setattr(sources, "_decode", failing_decode)
    np.testing.assert_array_equal(load_images(str(data), 16, count=4, seed=2, cache_dir=cache), first)
    # other arguments are other entries
    monkeypatch.setattr(sources, "_decode", counting_decode)
    load_images(str(data), 16, count=4, seed=3, cache_dir=cache)
    assert len(calls) == 4 and len(list(cache.glob("*.npy"))) == 2

    # a changed source file (other size and mtime) invalidates the entry
    calls.clear()
    target = data / "a" / "img0.png"
    Image.new("RGB", (50, 50), (1, 2, 3)).save(target)
    os.utime(target, (1_000_000_000, 1_000_000_000))
    load_images(str(data), 16, count=4, seed=2, cache_dir=cache)
    assert len(calls) == 4


def test_cache_of_synthetic_and_parquet(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    a = load_images("synthetic:stripes", 16, count=5, cache_dir=cache)
    monkeypatch.setattr(synthetic, "render", lambda *a, **k: pytest.fail("rendered despite the cache"))
    np.testing.assert_array_equal(load_images("synthetic:stripes", 16, count=5, cache_dir=cache), a)

    _write_parquet(tmp_path / "d.parquet", _image_bytes(5))
    b = load_images(str(tmp_path / "d.parquet"), 16, cache_dir=cache)
    monkeypatch.setattr(sources, "_decode", lambda *a, **k: pytest.fail("decoded despite the cache"))
    np.testing.assert_array_equal(load_images(str(tmp_path / "d.parquet"), 16, cache_dir=cache), b)
    # a corrupt cache file is ignored (and rewritten), not trusted
    for f in cache.glob("*d.parquet*.npy"):
        f.write_bytes(b"corrupt")
    monkeypatch.setattr(sources, "_decode", lambda data, name, res: np.zeros((res, res, 3), np.uint8))
    assert (load_images(str(tmp_path / "d.parquet"), 16, cache_dir=cache) == 0).all()


# ---------------------------------------------------------------------------------------------
# S3 (a real moto server on loopback)


def _s3fs(s3_server):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                             client_kwargs={"endpoint_url": s3_server["endpoint_url"]})


def test_s3_folder_and_parquet_match_local(tmp_path, s3_server, s3_bucket):
    local = tmp_path / "imgs"
    local.mkdir()
    _write_folder(local)
    _write_parquet(tmp_path / "d.parquet", _image_bytes(6), row_group_size=4)
    fs = _s3fs(s3_server)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe(f"{s3_bucket}/imgs/{path.relative_to(local).as_posix()}", path.read_bytes())
    fs.pipe(f"{s3_bucket}/imgs-extra/x.png", _png_bytes((4, 4), (0, 0, 0)))  # a sibling prefix
    fs.pipe(f"{s3_bucket}/tables/d.parquet", (tmp_path / "d.parquet").read_bytes())

    np.testing.assert_array_equal(load_images(f"s3://{s3_bucket}/imgs", 16), load_images(str(local), 16))
    np.testing.assert_array_equal(load_images(f"s3://{s3_bucket}/imgs/", 16, count=3, seed=4),
                                  load_images(str(local), 16, count=3, seed=4))
    np.testing.assert_array_equal(load_images(f"s3://{s3_bucket}/tables/d.parquet", 16, count=4, seed=1),
                                  load_images(str(tmp_path / "d.parquet"), 16, count=4, seed=1))
    np.testing.assert_array_equal(load_images(f"s3://{s3_bucket}/tables", 16),
                                  load_images(str(tmp_path / "d.parquet"), 16))


def test_s3_errors_cache_and_storage_options(tmp_path, s3_server, s3_bucket, monkeypatch):
    fs = _s3fs(s3_server)
    fs.pipe(f"{s3_bucket}/shots/a.png", _png_bytes((8, 8), COLOURS[0]))
    fs.pipe(f"{s3_bucket}/shots/b.png", b"broken")
    with pytest.raises(DataError, match=rf"s3://{s3_bucket}/shots/b\.png"):
        load_images(f"s3://{s3_bucket}/shots", 8)
    with pytest.raises(DataError, match=rf"s3://{s3_bucket}/nothing"):
        load_images(f"s3://{s3_bucket}/nothing", 8)

    # the cache key follows the objects' ETags: a rewritten object is decoded again
    cache = tmp_path / "cache"
    fs.pipe(f"{s3_bucket}/shots/b.png", _png_bytes((8, 8), COLOURS[1]))
    first = load_images(f"s3://{s3_bucket}/shots", 8, cache_dir=cache)
    assert _colour_order(first) == [0, 1]
    fs.pipe(f"{s3_bucket}/shots/b.png", _png_bytes((9, 9), COLOURS[2]))
    assert _colour_order(load_images(f"s3://{s3_bucket}/shots", 8, cache_dir=cache)) == [0, 2]

    # explicit storage_options work without the AWS environment
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_server["endpoint_url"]}}
    out = load_images(f"s3://{s3_bucket}/shots", 8, storage_options=options)
    assert _colour_order(out) == [0, 2]
