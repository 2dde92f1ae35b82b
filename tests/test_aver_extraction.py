"""examples/aver extraction: WAV formats, seeded backbone, clip-id collisions, the
extraction report, low-rate audio and the face choice."""

import json
import struct
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

cv2 = pytest.importorskip("cv2", reason="the example's video reader needs opencv")
pytest.importorskip("torchvision", reason="the example's frame embeddings need torchvision")

from aver import audio, data, video  # noqa: E402
from aver.extract_features import ClipExtractor, ExtractConfig, extract_all, find_clips  # noqa: E402
from aver.feature_settings import FeatureMismatchError  # noqa: E402
from test_aver_example import face_frame, write_avi  # noqa: E402

RATE = 16000
TONE = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(RATE // 4) / RATE)


# ------------------------------------------------------------------------ WAV

# Largest error of a full-scale-ish tone after quantisation (half a step, plus slack).
TOLERANCE = {"pcm8": 1 / 128, "pcm16": 1e-4, "pcm24": 1e-6, "pcm32": 1e-6,
             "float32": 1e-7, "float64": 1e-7}


@pytest.mark.parametrize("extensible", [False, True], ids=["plain", "extensible"])
@pytest.mark.parametrize("encoding", audio.WAV_ENCODINGS)
def test_read_wav_every_pcm_and_float_format(tmp_path, encoding, extensible):
    stereo = np.stack([TONE, -TONE / 2], 1)
    path = tmp_path / "x.wav"
    audio.write_wav(path, stereo, RATE, encoding=encoding, extensible=extensible)
    tag = struct.unpack_from("<H", path.read_bytes(), 20)[0]
    assert tag == (65534 if extensible else 3 if encoding.startswith("float") else 1)
    samples, rate = audio.read_wav(path)
    assert rate == RATE and samples.dtype == np.float32
    assert np.abs(samples - TONE / 4).max() < TOLERANCE[encoding]  # channels mixed to mono


def test_read_wav_agrees_with_the_stdlib_and_skips_other_chunks(tmp_path):
    pcm = (TONE * 32767).astype("<i2")
    with wave.open(str(tmp_path / "std.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(RATE), f.writeframes(pcm.tobytes())
    samples, _ = audio.read_wav(tmp_path / "std.wav")
    assert np.array_equal(samples, pcm.astype(np.float32) / 32768)
    # An odd-sized LIST chunk before the data (word padding), as editors write.
    blob = (tmp_path / "std.wav").read_bytes()
    fmt_end = 12 + 8 + 16
    odd = b"LIST" + struct.pack("<I", 5) + b"INFOx" + b"\x00"
    body = blob[12:fmt_end] + odd + blob[fmt_end:]
    (tmp_path / "list.wav").write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body)
    assert np.array_equal(audio.read_wav(tmp_path / "list.wav")[0], samples)


def test_read_wav_rejects_compressed_and_broken_files(tmp_path):
    audio.write_wav(tmp_path / "a.wav", TONE, RATE)
    blob = bytearray((tmp_path / "a.wav").read_bytes())
    blob[20:22] = struct.pack("<H", 2)  # MS ADPCM
    (tmp_path / "adpcm.wav").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"adpcm.wav: unsupported WAV encoding \(format code 2"):
        audio.read_wav(tmp_path / "adpcm.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF....not a wav")
    with pytest.raises(ValueError, match="junk.wav: not a WAV file"):
        audio.read_wav(tmp_path / "junk.wav")


def test_low_rate_audio_warning_names_the_file(tmp_path):
    audio.write_wav(tmp_path / "phone.wav", TONE, 8000)
    with pytest.warns(UserWarning, match=r"phone.wav: sample rate 8000 Hz .* stop at 4000 Hz"):
        frames, rate = audio.wav_to_frames(tmp_path / "phone.wav", return_rate=True)
    assert rate == 8000 and torch.isfinite(frames).all()


# ------------------------------------------------------------------------ backbone

def test_random_backbone_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="seed 0"):
        a, _ = video.build_backbone("resnet18", seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream is untouched
    with pytest.warns(UserWarning):
        b, _ = video.build_backbone("resnet18", seed=0)
        c, _ = video.build_backbone("resnet18", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])


# ------------------------------------------------------------------------ faces

def test_the_most_confident_face_wins_over_the_largest():
    frame = face_frame()
    boxes = [(150, 10, 160, 160, 0.2), (40, 50, 100, 100, 3.0)]  # big false positive, real face
    crop, found = video.crop_face(frame, lambda img: boxes, margin=0.2)
    assert found and np.array_equal(crop, frame[30:170, 20:160])
    if video.haar_available():
        found = video.make_face_detector("haar")(frame)
        assert found and all(len(b) == 5 for b in found)  # the Haar detector gives scores


# ------------------------------------------------------------------------ extraction runs

def media_tree(root, names):
    for label, clip_id in names:
        (root / label).mkdir(parents=True, exist_ok=True)
        write_avi(root / label / f"{clip_id}.avi", [face_frame()] * 4, fps=10)
        audio.write_wav(root / label / f"{clip_id}.wav", 0.1 * TONE[:6000], RATE)


@pytest.fixture(scope="module")
def extractor():
    with pytest.warns(UserWarning, match="random weights"):
        return ClipExtractor(ExtractConfig(fps=5, max_frames=2, image_size=32,
                                           face_detector="none"))


def test_clip_id_collision_between_runs_is_refused_naming_both_files(tmp_path, extractor):
    classes = ["happy", "sad"]
    media_tree(tmp_path / "Train", [("happy", "c1"), ("sad", "c2")])
    media_tree(tmp_path / "Val", [("sad", "c1"), ("happy", "v1")])  # c1 again: another clip
    out = tmp_path / "feats"
    first = extract_all(find_clips(tmp_path / "Train", classes)[0], out, extractor, classes,
                        split="train", progress=False)
    assert sorted(first["written"]) == ["c1", "c2"]
    for overwrite in (False, True):
        second = extract_all(find_clips(tmp_path / "Val", classes)[0], out, extractor, classes,
                             split="test", overwrite=overwrite, progress=False)
        reason = second["failed"]["c1"]
        assert "collides" in reason and str(tmp_path / "Train" / "happy" / "c1.avi") in reason \
            and str(tmp_path / "Val" / "sad" / "c1.avi") in reason
        assert second["written"] == ["v1"] or overwrite
    # The train clip did not leak into the test split, and kept its label.
    assert data.read_split(out / "splits" / "test.txt") == ["v1"]
    assert data.load_clip(out / "c1.pt")["label"] == 0
    # Re-running the same media is still "already there", not a collision.
    again = extract_all(find_clips(tmp_path / "Train", classes)[0], out, extractor, classes,
                        split="train", progress=False)
    assert sorted(again["existing"]) == ["c1", "c2"] and not again["failed"]
    # Every run is in the report, none overwritten.
    runs = json.loads((out / "extraction_report.json").read_text())["runs"]
    assert [r["split"] for r in runs] == ["train", "test", "test", "train"]
    assert runs[0]["written"] == first["written"]
    clip = data.load_clip(out / "c2.pt")
    assert clip["meta"]["features"]["video_weights"] == "random-seed:0"
    assert clip["meta"]["sample_rate"] == RATE
    assert json.loads((out / "features.json").read_text()) == extractor.settings


def test_low_rate_clip_is_refused_and_other_settings_refuse_the_directory(tmp_path, extractor):
    classes = ["happy", "sad"]
    media_tree(tmp_path / "m", [("happy", "ok"), ("sad", "phone")])
    audio.write_wav(tmp_path / "m" / "sad" / "phone.wav", TONE, 8000)
    with pytest.warns(UserWarning, match="phone.wav"):
        report = extract_all(find_clips(tmp_path / "m", classes)[0], tmp_path / "f", extractor,
                             classes, progress=False)
    assert report["written"] == ["ok"]
    assert "phone.wav (8000 Hz)" in report["failed"]["phone"] and \
        "fmax 4000.0 instead of 8000.0" in report["failed"]["phone"]
    with pytest.warns(UserWarning):
        other = ClipExtractor(ExtractConfig(fps=5, max_frames=2, image_size=48,
                                            face_detector="none"))
    with pytest.raises(FeatureMismatchError, match="image_size 48 instead of 32"):
        extract_all(find_clips(tmp_path / "m", classes)[0], tmp_path / "f", other, classes,
                    progress=False)
