"""examples/aver/predict.py: unlabelled clips (feature files or media) -> predictions,
attention PNGs, and the refusal of features made with other settings."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

cv2 = pytest.importorskip("cv2", reason="the example's video reader needs opencv")
pytest.importorskip("torchvision", reason="the example's frame embeddings need torchvision")

from aver import audio, data, predict, train  # noqa: E402
from aver.extract_features import ClipExtractor, ExtractConfig, extract_all, find_clips  # noqa: E402
from aver.feature_settings import FeatureMismatchError  # noqa: E402
from test_aver_example import face_frame, write_avi  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_train(out, *extra):
    return train.train(train.build_parser().parse_args(
        ["--hidden", "8", "--fbp-out", "4", "--batch-size", "8", "--epochs", "1",
         "--no-progress", "--out", str(out), *extra]))


def make_media(root, n_per_class=1, classes=("happy", "sad"), seconds=0.6):
    """A tiny AFEW-like tree: ROOT/<class>/<clip>.avi + .wav; tones differ by class."""
    for k, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            frames = [np.roll(face_frame(), 5 * j + 40 * k, axis=1) for j in range(int(10 * seconds))]
            write_avi(root / label / f"{label}{i}.avi", frames, fps=10)
            t = np.arange(int(16000 * seconds)) / 16000
            audio.write_wav(root / label / f"{label}{i}.wav",
                            0.3 * np.sin(2 * np.pi * (300 + 200 * k + 50 * i) * t), 16000)


def extract(root, out, split, **kw):
    cfg = ExtractConfig(fps=5, max_frames=3, image_size=32, backbone="resnet18",
                        face_detector="none", **kw)
    with pytest.warns(UserWarning, match="random weights"):
        extractor = ClipExtractor(cfg)
    sources, _ = find_clips(root, ["happy", "sad"])
    return extract_all(sources, out, extractor, ["happy", "sad"], split=split, progress=False)


def test_predict_feature_files_writes_csv_json_and_attention_pngs(tmp_path):
    feats = data.write_synthetic(tmp_path / "syn", sizes=(24, 8, 8), seed=0)
    tiny_train(tmp_path / "run", "--data", str(feats))
    # Unlabelled clips in a folder of their own, as AFEW's Test set would be.
    new = tmp_path / "unlabelled"
    task = data.SyntheticTask()
    for clip in task.sample(3, seed=99, prefix="u"):
        data.save_clip({**clip, "label": -1, "label_name": ""}, new)
    rows = predict.main([str(new), "--checkpoint", str(tmp_path / "run" / "best.pt"),
                         "--out", str(tmp_path / "pred"), "--save-attention"])
    assert [r["clip_id"] for r in rows] == ["u99_00000", "u99_00001", "u99_00002"]
    classes = list(data.EMOTIONS)
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and table[0]["label"] == ""
    for row in table:
        p = np.array([float(row[f"p_{c}"]) for c in classes])
        assert abs(p.sum() - 1) < 1e-4 and row["predicted"] == classes[int(p.argmax())]
        assert float(row["probability"]) == pytest.approx(p.max(), abs=1e-6)
    saved = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert saved["classes"] == classes and len(saved["predictions"]) == 3
    # The predictions are the model's: the same clips through the model give them.
    model, _ = train.load_checkpoint(tmp_path / "run" / "best.pt", torch.device("cpu"))
    clips = [data.load_clip(p) for p in sorted(new.glob("*.pt"))]
    probs = predict.predict_clips(model, clips, torch.device("cpu"))
    for r, pr in zip(saved["predictions"], probs):
        assert [r["probabilities"][c] for c in classes] == pytest.approx(pr["probs"].tolist())
        assert pr["weights"]["audio"].sum() == pytest.approx(1.0, abs=1e-5)
    for r in rows:
        assert Path(r["attention_png"]).stat().st_size > 5000


def test_predict_refuses_features_made_with_other_settings(tmp_path):
    feats = data.write_synthetic(tmp_path / "syn", sizes=(16, 8, 8), seed=0)
    tiny_train(tmp_path / "run", "--data", str(feats))
    other = data.SyntheticTask(seed=7)  # another task: same shapes, other meaning
    path = data.save_clip(other.sample(1, seed=1, prefix="o")[0], tmp_path / "other")
    with pytest.raises(FeatureMismatchError, match=r"task_seed 7 instead of 1234"):
        predict.main([str(path), "--checkpoint", str(tmp_path / "run" / "best.pt"),
                      "--out", str(tmp_path / "pred")])
    # Two inputs with one clip id are refused, naming both.
    a = data.save_clip(data.SyntheticTask().sample(1, seed=1, prefix="d")[0], tmp_path / "a")
    b = data.save_clip(data.SyntheticTask().sample(1, seed=1, prefix="d")[0], tmp_path / "b")
    with pytest.raises(ValueError, match=rf"{a}.*{b}"):
        predict.main([str(a), str(b), "--checkpoint", str(tmp_path / "run" / "best.pt")])


def test_media_walkthrough_train_then_predict_videos(tmp_path):
    """AFEW layout on generated media: extract Train and Val (seeded random backbone),
    train, then predict a folder of videos from the checkpoint's settings."""
    make_media(tmp_path / "Train", n_per_class=2)
    make_media(tmp_path / "Val", n_per_class=1, seconds=0.5)
    # Val clips named like Train clips would collide: give Val its own names.
    for p in sorted((tmp_path / "Val").rglob("*.*")):
        p.rename(p.with_name("val_" + p.name))
    assert not extract(tmp_path / "Train", tmp_path / "feats", "train")["failed"]
    assert not extract(tmp_path / "Val", tmp_path / "feats", "test")["failed"]
    tiny_train(tmp_path / "run", "--data", str(tmp_path / "feats"))
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert state["feature_settings"]["video_weights"] == "random-seed:0"
    rows = predict.main([str(tmp_path / "Val"), "--checkpoint", str(tmp_path / "run" / "best.pt"),
                         "--out", str(tmp_path / "pred"), "--face-detector", "none",
                         "--max-frames", "3", "--save-attention"])
    assert sorted(r["clip_id"] for r in rows) == ["val_happy0", "val_sad0"]
    # Media predicted directly equals the same media's extracted feature files.
    from_feats = predict.main([str(tmp_path / "feats" / "val_happy0.pt"), "--checkpoint",
                               str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "p2")])
    by_id = {r["clip_id"]: r for r in rows}
    assert by_id["val_happy0"]["probabilities"] == pytest.approx(from_feats[0]["probabilities"])
    assert all(Path(r["attention_png"]).stat().st_size > 5000 for r in rows)

    # A different random backbone is a different feature space: refused, naming it.
    with pytest.warns(UserWarning, match="random weights"):
        with pytest.raises(FeatureMismatchError, match=r"video_weights 'random-seed:1'"):
            extract_all(find_clips(tmp_path / "Val", ["happy", "sad"])[0], tmp_path / "feats",
                        ClipExtractor(ExtractConfig(fps=5, max_frames=3, image_size=32,
                                                    face_detector="none", backbone_seed=1)),
                        ["happy", "sad"], progress=False)
