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

from aver import data, make_demo_media, predict, train  # noqa: E402
from aver.extract_features import ClipExtractor, ExtractConfig, extract_all, find_clips  # noqa: E402
from aver.feature_settings import FeatureMismatchError  # noqa: E402


# One torch thread for every test here (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_train(out, *extra):
    return train.train(train.build_parser().parse_args(
        ["--hidden", "8", "--fbp-out", "4", "--batch-size", "8", "--epochs", "1",
         "--no-progress", "--out", str(out), *extra]))


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
    """The README's walk-through on generated media: extract Train and Val (seeded random
    backbone), train, then predict the unlabelled Test folder from the checkpoint."""
    train_dir, val_dir, test_dir = make_demo_media.write_demo(
        tmp_path / "demo", classes=("happy", "sad"), train=2, val=1, test=2, seconds=0.5)
    assert not extract(train_dir, tmp_path / "feats", "train")["failed"]
    assert not extract(val_dir, tmp_path / "feats", "test")["failed"]
    tiny_train(tmp_path / "run", "--data", str(tmp_path / "feats"))
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert state["feature_settings"]["video_weights"] == "random-seed:0"
    ckpt = str(tmp_path / "run" / "best.pt")
    rows = predict.main([str(test_dir), "--checkpoint", ckpt, "--out", str(tmp_path / "pred"),
                         "--face-detector", "none", "--max-frames", "3", "--save-attention"])
    assert sorted(r["clip_id"] for r in rows) == ["test_000", "test_001"]
    assert all(r["label"] is None for r in rows)
    assert all(Path(r["attention_png"]).stat().st_size > 5000 for r in rows)
    # A video predicted directly equals its extracted feature file predicted.
    val_video = sorted(val_dir.rglob("*.avi"))[0]
    direct = predict.main([str(val_video), "--checkpoint", ckpt, "--out", str(tmp_path / "p1"),
                           "--face-detector", "none", "--max-frames", "3"])
    from_feats = predict.main([str(tmp_path / "feats" / f"{val_video.stem}.pt"), "--checkpoint",
                               ckpt, "--out", str(tmp_path / "p2")])
    assert direct[0]["probabilities"] == pytest.approx(from_feats[0]["probabilities"])

    # A different random backbone is a different feature space: refused, naming it.
    with pytest.warns(UserWarning, match="random weights"):
        with pytest.raises(FeatureMismatchError, match=r"video_weights 'random-seed:1'"):
            extract_all(find_clips(val_dir, ["happy", "sad"])[0], tmp_path / "feats",
                        ClipExtractor(ExtractConfig(fps=5, max_frames=3, image_size=32,
                                                    face_detector="none", backbone_seed=1)),
                        ["happy", "sad"], progress=False)


def test_mismatch_message_names_only_what_differs():
    from aver.feature_settings import check_compatible

    media = {"type": "media", "video_weights": "random-seed:0", "n_mels": 64, "fps": 5.0}
    check_compatible(media, dict(media), "a", "b")  # equal: no error
    check_compatible(None, media, "a", "b")  # unknown settings are not checked
    with pytest.raises(FeatureMismatchError) as e:
        check_compatible(media, {**media, "n_mels": 40, "video_weights": "sha256:ab"}, "ckpt", "x.pt")
    msg = str(e.value)
    assert "x.pt differs from ckpt" in msg and "n_mels 40 instead of 64" in msg
    assert "video_weights 'sha256:ab' instead of 'random-seed:0'" in msg and "fps" not in msg
    with pytest.raises(FeatureMismatchError, match=r"in type 'synthetic' instead of 'media'$"):
        check_compatible(media, {"type": "synthetic", "audio_dim": 40}, "ckpt", "x.pt")
