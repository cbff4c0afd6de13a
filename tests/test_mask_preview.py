"""``deidfs mask preview`` and the masks in ``deidfs describe-profile``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import sample_file
from deidfs.cli import common
from deidfs.cli.main import main

CONFIG = """\
[profiles.Sono]
base = "+Pixel"
comment = "ultrasound with its header bar blacked out"

[[profiles.Sono.masks]]
modality = "US"
rows = 240
columns = 320
rects = [[0, 0, 320, 20], [300, 200, 100, 30]]

[[profiles.Sono.masks]]
modality = "CT"
manufacturer = "ge medical systems"
rects = [[4, 6, 20, 10]]

[[profiles.Sono.masks]]
modality = "CT"
enabled = false
rects = [[0, 0, 5, 5]]

[profiles.Listed]
base = "Basic"

[[profiles.Listed.masks]]
modality = "CT"
rects = [[0, 0, 5, 5]]
"""
RED = (255, 0, 0)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DEIDFS_CONFIG", raising=False)
    monkeypatch.setattr(common, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config.toml")
    path = tmp_path / "deidfs.toml"
    path.write_text(CONFIG)
    return path


def _preview(config: Path, name: str, png: Path, profile: str = "Sono") -> int:
    argv = ["mask", "preview", str(sample_file(name)), "--profile", profile, "--png", str(png)]
    return main([*argv, "--config", str(config)])


def _rgb(png: Path) -> np.ndarray:
    with Image.open(png) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _red(png: Path) -> np.ndarray:
    arr = _rgb(png)
    return (arr[..., 0] == 255) & (arr[..., 1] == 0) & (arr[..., 2] == 0)


def test_preview_draws_matching_masks_on_a_colour_multiframe_image(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "out" / "us.png"
    assert _preview(config, "examples_ybr_color.dcm", png) == 0
    out = capsys.readouterr().out
    assert "mask #1 (modality=US, rows=240, columns=320)" in out
    assert "matches (rectangles cut to the image)" in out
    assert "mask #2 (modality=CT, manufacturer=ge medical systems): [4,6 20x10]: does not" in out
    assert "blacked out in every frame" in out
    assert _rgb(png).shape == (240, 320, 3)  # the first frame, full size
    red = _red(png)
    # Outlines of [0,0 320x20] and of [300,200 100x30] cut to [300,200 20x30].
    assert red[0, :].all()
    assert red[19, :].all()
    assert red[200:230, 300].all()
    assert red[229, 300:320].all()
    assert not red[100, 100:200].any()  # inside the image, away from any outline


def test_preview_windows_grayscale_to_eight_bits(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "ct.png"
    assert _preview(config, "CT_small.dcm", png) == 0
    out = capsys.readouterr().out
    assert "mask #2" in out
    assert "mask #3 (modality=CT, disabled): [0,0 5x5]: does not match: disabled" in out
    arr = _rgb(png)
    red = _red(png)
    assert red[6, 4:24].all()
    assert red[15, 4:24].all()
    assert red[6:16, 4].all()
    assert not red[0:5, 0:5].any()  # the disabled mask is not drawn
    gray = arr[~red]
    assert (gray[:, 0] == gray[:, 1]).all()  # gray stays gray
    assert gray.min() == 0
    assert gray.max() == 255


def test_preview_without_a_matching_mask_exits_1(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "mr.png"
    assert _preview(config, "MR_small.dcm", png) == 1
    captured = capsys.readouterr()
    assert "no mask of profile 'Sono' matches this image" in captured.err
    assert "modality 'MR' is not 'US'" in captured.out
    assert png.exists()  # the frame, to design a mask from
    assert not _red(png).any()


def test_preview_says_when_the_profile_does_not_apply_its_masks(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _preview(config, "CT_small.dcm", tmp_path / "x.png", profile="Listed") == 0
    out = capsys.readouterr().out
    assert "applies no masks" in out
    assert "served with its pixels as they are" in out


def test_preview_unknown_profile_exits_66(config: Path, tmp_path: Path) -> None:
    assert _preview(config, "CT_small.dcm", tmp_path / "x.png", profile="NoSuch") == 66
    assert not (tmp_path / "x.png").exists()


def test_describe_profile_shows_masks(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(config), "describe-profile", "Sono"]) == 0
    out = capsys.readouterr().out
    assert "masks: 3, applied" in out
    assert "mask: modality=US, rows=240, columns=320: [0,0 320x20] [300,200 100x30]" in out
    assert "mask: modality=CT: [0,0 5x5] (disabled)" in out
    assert main(["--config", str(config), "describe-profile", "Sono", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["apply_masks"] is True  # inherited from +Pixel
    assert doc["masks"][0]["rects"] == [[0, 0, 320, 20], [300, 200, 100, 30]]
    assert doc["masks"][2]["enabled"] is False
    assert main(["--config", str(config), "describe-profile", "Listed"]) == 0
    assert "masks: 1, not applied" in capsys.readouterr().out
