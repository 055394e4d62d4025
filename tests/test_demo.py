"""The synthetic demo corpus: layout, determinism, label statistics, learnable prosody."""

import re
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from conilium import CLASSES, SAMPLE_RATE
from conilium import demo
from conilium.corpus import load_corpus
from conilium.demo import make_demo_corpus
from conilium.errors import ConfigError, CorpusError


@pytest.fixture(scope="module")
def corpus(demo_corpus):
    return load_corpus(demo_corpus)


def _labelled(corpus):
    return [c for c in corpus if c.split != "Test3"]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_reads_back(demo_corpus, corpus):
    assert sorted(p.name for p in demo_corpus.iterdir()) == ["Audios", "Labels", "Transcripts"]
    assert len(corpus) == 300
    assert {s: len(corpus.split(s)) for s in corpus.splits} == {"Train": 180, "Development": 75, "Test3": 45}
    assert corpus.detailed_layout == "emodetail"
    assert corpus.orphan_annotations == 0
    assert all(re.fullmatch(r"MSP-PODCAST_\d{4}_\d{4}\.wav", c.name) for c in corpus)
    assert all(c.duration is not None and c.duration > 0 for c in corpus)
    assert len(list((demo_corpus / "Audios").iterdir())) == 300
    for clip in list(corpus)[:10]:
        info = sf.info(str(corpus.audio_path(clip.name)))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SAMPLE_RATE, 1, "PCM_16", "WAV")


def test_detailed_rows_in_release_format(demo_corpus):
    lines = (demo_corpus / "Labels" / "labels_detailed.csv").read_text().splitlines()
    assert lines[0] == "FileName,EmoDetail"
    pattern = r'MSP-PODCAST_\d{4}_\d{4}\.wav,"WORKER\d{5}; [A-Za-z-]+; [A-Za-z,-]*; A:\d\.0; V:\d\.0; D:\d\.0;"'
    assert all(re.fullmatch(pattern, line) for line in lines[1:])


def test_test3_is_unlabelled(corpus):
    for clip in corpus.split("Test3"):
        assert clip.emo_class is None and clip.annotations == ()
        assert clip.act is None and clip.val is None and clip.dom is None
    for clip in _labelled(corpus):
        assert clip.emo_class is not None
        assert all(1.0 <= v <= 7.0 for v in (clip.act, clip.val, clip.dom))


def test_class_imbalance_and_non_target_consensus(corpus):
    counts = Counter(c.emo_class for c in _labelled(corpus))
    by_frequency = [c for c, _ in counts.most_common() if c in CLASSES]
    assert by_frequency[:2] == ["N", "H"]
    assert set(CLASSES) <= set(counts)
    n = sum(counts.values())
    assert 0 < counts["O"] / n < 0.06
    assert 0 < counts["X"] / n < 0.12


def test_annotations(corpus):
    words = Counter()
    for clip in _labelled(corpus):
        assert 5 <= len(clip.annotations) <= 7
        assert len({a.worker for a in clip.annotations}) == len(clip.annotations)
        primaries = Counter(a.primary_class or "O" for a in clip.annotations)
        top = primaries.most_common()
        expected = "X" if len(top) > 1 and top[0][1] == top[1][1] else top[0][0]
        assert clip.emo_class == expected, clip.name
        for a in clip.annotations:
            assert re.fullmatch(r"WORKER\d{5}", a.worker)
            assert a.primary not in a.secondary
            words.update(a.ignored_words())
    assert any(w.startswith("Other-") for w in words) and words["Other"] > 0
    assert {"Frustrated", "Concerned", "Amused", "Excited"} & set(words)


def test_durations_like_msp_podcast(corpus):
    d = np.array([c.duration for c in corpus])
    assert 5.0 <= d.mean() <= 6.6
    assert 1.5 <= d.min() and d.max() <= 14.0
    assert 0.05 < np.mean(d > 8.0) < 0.35


def test_speakers(corpus):
    assert {c.gender for c in corpus} == {"Male", "Female", "Unknown"}
    assert all((c.speaker is None) == (c.gender == "Unknown") for c in corpus)
    genders, splits = {}, {}
    for c in corpus:
        if c.speaker is not None:
            genders.setdefault(c.speaker, set()).add(c.gender)
            splits.setdefault(c.speaker, set()).add(c.split)
    assert all(len(g) == 1 for g in genders.values())
    assert all(len(s) == 1 for s in splits.values())  # speakers are disjoint between splits


def _band_features(path):
    """Mean and sd of log energies in 16 bands over active frames, and the share of active frames."""
    x, sr = sf.read(str(path), dtype="float32")
    frames = np.lib.stride_tricks.sliding_window_view(x, 512)[::256]
    power = np.abs(np.fft.rfft(frames * np.hanning(512), axis=1)) ** 2
    energy = power.sum(axis=1)
    active = energy > 0.01 * energy.max()
    edges = np.geomspace(8, 240, 17).astype(int)  # rfft bins, about 250 Hz to 7.5 kHz
    bands = np.log(np.stack([power[active, lo:hi].sum(axis=1) for lo, hi in zip(edges[:-1], edges[1:])], 1) + 1e-10)
    return np.concatenate([bands.mean(0), bands.std(0), [active.mean()]])


def test_prosody_is_learnable(corpus):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def data(split):
        clips = [c for c in corpus.split(split) if c.scoreable]
        return (np.stack([_band_features(corpus.audio_path(c.name)) for c in clips]),
                np.array([c.emo_class for c in clips]))

    x_train, y_train = data("Train")
    x_dev, y_dev = data("Development")
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    model.fit(x_train, y_train)
    score = balanced_accuracy_score(y_dev, model.predict(x_dev))
    assert score > 2.0 / len(CLASSES)  # twice chance
    assert score < 0.95  # classes overlap: not trivially separable


def test_noise_files(demo_corpus):
    files = sorted((demo_corpus.parent / "noise").iterdir())
    assert len(files) == 8
    assert {f.stem.split("_")[-1] for f in files} == {"white", "pink", "brown", "babble", "hum"}
    for f in files:
        info = sf.info(str(f))
        assert info.samplerate == SAMPLE_RATE and info.channels == 1
        assert 3.0 <= info.duration <= 10.0
        x, _ = sf.read(str(f))
        assert np.all(np.isfinite(x)) and np.sqrt(np.mean(x ** 2)) > 0.01


def test_deterministic(tmp_path):
    a = make_demo_corpus(tmp_path / "a", clips=24, seed=7, noise_dir=tmp_path / "na", noise_files=2)
    b = make_demo_corpus(tmp_path / "b", clips=24, seed=7, noise_dir=tmp_path / "nb", noise_files=2)
    c = make_demo_corpus(tmp_path / "c", clips=24, seed=8)
    assert _files(a) == _files(b)
    assert _files(tmp_path / "na") == _files(tmp_path / "nb")
    files_c = _files(c)
    assert files_c["Labels/labels_detailed.csv"] != _files(a)["Labels/labels_detailed.csv"]
    assert sorted(files_c) != sorted(_files(a))


def test_refuses_non_empty_output_and_overwrites_on_request(tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CorpusError, match="not empty"):
        make_demo_corpus(out, clips=12)
    assert (out / "keep.txt").read_text() == "mine"
    make_demo_corpus(out, clips=12, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["Audios", "Labels", "Transcripts"]
    assert len(load_corpus(out)) == 12
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]  # no temporary directories left


def test_noise_dir_inside_corpus(tmp_path):
    out = make_demo_corpus(tmp_path / "corpus", clips=12, noise_dir=tmp_path / "corpus" / "noise", noise_files=1)
    assert len(list((out / "noise").iterdir())) == 1
    assert len(load_corpus(out)) == 12
    with pytest.raises(ConfigError, match="Audios"):
        make_demo_corpus(tmp_path / "other", clips=12, noise_dir=tmp_path / "other" / "Audios" / "noise")


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(path, x):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        sf.write(str(path), x, SAMPLE_RATE, subtype="PCM_16")

    monkeypatch.setattr(demo, "_write_wav", failing_write)
    with pytest.raises(KeyboardInterrupt):
        make_demo_corpus(tmp_path / "corpus", clips=12)
    assert list(tmp_path.iterdir()) == []


def test_rejects_too_few_clips(tmp_path):
    with pytest.raises(ConfigError, match="at least"):
        make_demo_corpus(tmp_path / "corpus", clips=demo.MIN_CLIPS - 1)


def test_synthetic_transcripts_carry_part_of_the_emotion(demo_corpus, corpus):
    from conilium.demo import CUE_WORDS

    texts = corpus.transcripts().require_all().texts  # every clip has one, UTF-8, not empty
    assert list(texts) == list(corpus.clips)
    cue_class = {w: c for c, words in CUE_WORDS.items() for w in words}
    scored = [c for c in corpus if c.scoreable]
    hits = 0
    for clip in scored:
        counts = Counter(cue_class[w] for w in texts[clip.name].split() if w in cue_class)
        hits += bool(counts) and counts.most_common(1)[0][0] == clip.emo_class
    majority = Counter(c.emo_class for c in scored).most_common(1)[0][1] / len(scored)
    # the cue words beat always guessing the commonest class, and are far from saying it all
    assert majority + 0.05 < hits / len(scored) < 0.8
