"""A miniature OASIS-1 archive, served from 127.0.0.1, for the data and tutorial tests."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from quicknat.data.phantom import make_phantom
from quicknat.labels import ASEG_TO_TISSUE, merge_labels

# id -> (mpr variant, has label)
SCANS = {
    "OAS1_0001_MR1": ("n4", True),
    "OAS1_0002_MR1": ("n3", True),
    "OAS1_0002_MR2": ("n4", True),
    "OAS1_0003_MR1": ("n4", False),
    **{f"OAS1_{i:04d}_MR1": ("n4" if i % 2 else "n3", True) for i in range(4, 13)},
}
SHAPE = (44, 52, 44)  # OASIS T88_111 is 176 x 208 x 176 at 1 mm: the same proportions at 4 mm


def _analyze(path: Path, data: np.ndarray, zooms=(4.0, 4.0, 4.0)) -> None:
    hdr = nib.AnalyzeHeader()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.AnalyzeImage(data, None, hdr), str(path))


def build_tree(root: Path) -> Path:
    """OASIS-style disc folder with radiological (LAS) Analyze images and FSL_SEG tissue labels."""
    disc = root / "disc1"
    for n, (scan_id, (variant, has_label)) in enumerate(SCANS.items()):
        img, lab = make_phantom(SHAPE, (4.0, 4.0, 4.0), "LAS", seed=100 + n, skull=False)
        d = disc / scan_id
        base = f"{scan_id}_mpr_{variant}_anon_111_t88_masked_gfc"
        _analyze(d / "PROCESSED" / "MPRAGE" / "T88_111" / f"{base}.img", img.array.astype(np.int16))
        if has_label:
            tissue = merge_labels(lab.array, ASEG_TO_TISSUE).astype(np.uint8)
            _analyze(d / "FSL_SEG" / f"{base}_fseg.img", tissue)
    return disc


def make_archive(root: Path, name: str = "oasis_cross-sectional_disc1.tar.gz") -> tuple[Path, str]:
    src = root / "src"
    build_tree(src)
    archive = root / "serve" / name
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "disc1", arcname="disc1")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def hostile_archive(path: Path, member: str, kind: str = "file") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("disc1/OAS1_0001_MR1/readme.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(member)
        if kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return path


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        return super().do_GET()

    def log_message(self, *args):
        pass


@contextmanager
def serve(folder: Path):
    """Serve ``folder`` over HTTP on 127.0.0.1 (random port); yields (base URL, request log)."""
    handler = type("H", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
