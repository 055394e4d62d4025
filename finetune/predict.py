"""predict: emotion probabilities of audio files, from a finetune-best model directory or
from a train-head run.

>>> from conilium.finetune.predict import Predictor
>>> results = Predictor("models/wavlm-wbce-S").predict(["a.wav", "b.flac"])
>>> results[0].prediction, results[0].probabilities
>>> Predictor(run="runs/wbce-S").predict(["a.wav"])        # a head trained on a feature cache

Any file soundfile reads is accepted: other sample rates are resampled to 16 kHz,
several channels are averaged, and the audio is truncated and normalised as in
training (the model directory, or the cache the run's head was trained on, says how),
through the same signal path, upstream forward and prediction loop as training's
scoring. The predicted emotion is ``argmax(probabilities + offsets)`` with the decision
offsets tuned on the development set (a model directory's; a run's when it is the
output of ``conilium-eval tune-thresholds``; all zero otherwise). A file that cannot be
read, or is too short for the upstream, gets an error instead of a prediction; the
others are still predicted.

Both kinds of source come down to one :class:`~conilium.heads.audio.Loaded`: a module callable on
``(waves, lengths)`` that returns logits, the signal path, classes, decision offsets and
loss. A run whose head predicts the attributes (``train-head --task attributes|joint``)
gives them too: ``EmoAct, EmoVal, EmoDom`` on the corpus's 1–7 scale, after the class
columns (an attributes-only run has no class columns and no Prediction).

For a run, that module is :class:`~conilium.heads.audio.RunModel` (:mod:`conilium.heads.audio`,
beside the heads): the upstream its cache names, run as
extraction ran it (:class:`~conilium.extract.encoder.UpstreamRunner`: the run's
hidden-state layers, or every layer's mean and standard deviation over frames for a
``--pooled-stats`` head, in the cache's compute dtype), then the run's head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from conilium.audio import SignalPath
from conilium.classes import class_names
from conilium.errors import AudioError, ConfigError, ConiliumError
from conilium.heads.audio import Loaded, load_run
from conilium.heads.predict import predict_batches
from conilium.runtime import precision_dtype, resolve_device

from .data import AudioClips, collate_waves
from .model import load_model_dir, offsets_array
# the results and their writers need no torch (:mod:`.results`); re-exported here, where they were defined
from .results import (OUTPUT_FORMATS, SHORT_SECONDS, SILENT_DBFS, FilePrediction, audio_files,
                      fill_predictions, output_format, plan_inputs, read_list, results_csv, to_json, to_table,
                      write_csv, write_results)

__all__ = ["OUTPUT_FORMATS", "SHORT_SECONDS", "SILENT_DBFS", "FilePrediction", "Predictor", "audio_files",
           "load_model_source", "min_samples", "output_format", "predict_clips", "read_list", "results_csv",
           "to_json", "to_table", "write_csv", "write_results"]



def min_samples(model: nn.Module) -> int:
    """The fewest samples for which the upstream (``model.encoder``) outputs a frame."""
    n = 1
    while model.encoder.frames_for(n) < 1:
        n *= 2
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if model.encoder.frames_for(mid) >= 1 else (mid, hi)
    return hi


def predict_clips(model: nn.Module, dataset: AudioClips, indices: Sequence[int], loss: str, *,
                  device: torch.device, batch_size: int, precision: str = "auto", num_workers: int = 0,
                  progress: bool = False, desc: str = "predicting",
                  on_error: Optional[Callable[[int, AudioError], None]] = None,
                  on_peak: Optional[Callable[[int, float], None]] = None,
                  extra: Optional[Callable[[List[int]], tuple]] = None) -> Dict[int, np.ndarray]:
    """Class scores (sigmoid or softmax, as the loss sees them) of dataset items ``indices``,
    in batches of clips of similar duration. A clip that cannot be read stops it, unless
    ``on_error(index, error)`` takes it; ``on_peak(index, peak)`` receives each read clip's
    largest absolute sample (before normalisation). ``extra(indices)``: more inputs of the
    model for the batch's clips, after the waveforms and their lengths (a fusion run's tokens)."""
    dur = dataset.durations
    order = sorted(indices, key=lambda i: (0.0 if dur is None else float(dur[i]), i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_waves, num_workers=num_workers)

    def inputs():
        for waves, lengths, idx, errors, peaks in loader:
            for i, error in errors:
                if on_error is None:
                    raise ConiliumError(str(error))
                on_error(i, error)
            if on_peak is not None:
                for i, peak in zip(idx, peaks):
                    on_peak(i, peak)
            if idx:
                yield ((waves, lengths) if extra is None else (waves, lengths, *extra(list(idx)))), idx

    return predict_batches(model, inputs(), loss, device=device, dtype=precision_dtype(precision, device),
                           progress=progress, desc=desc, total=len(batches))


# ----------------------------------------------------------------------------- what is predicted with

def load_model_source(model_dir, *, device: torch.device, precision: str = "auto") -> Loaded:
    """A finetune-best model directory: its end-to-end model, truncation, normalisation and offsets."""
    model, info = load_model_dir(model_dir, device=device)
    norm = info["normalize"]
    ms = info["max_seconds"]
    signal = SignalPath(max_seconds=float(ms) if ms else None, normalize=norm["mode"], stats=norm.get("stats"),
                        # models written before the option read audio as False does
                        rescale_loud=bool(info.get("rescale_loud", False)))
    classes = tuple(info["classes"])
    return Loaded(model, signal, classes, offsets_array(info), info["loss"], precision, info,
                  class_names=class_names(classes, info.get("class_set")))


# ----------------------------------------------------------------------------- the predictor

class Predictor:
    """A finetune-best model directory (``model_dir``) or a train-head run (``run``) that
    predicts files in length-sorted batches, one code path for both (:class:`Loaded`).

    ``max_seconds`` None truncates as in training (the model's, or the run's cache's); 0
    reads whole files, up to ``max_whole_seconds`` (the upstream's attention memory grows
    with the square of the length: a 150 s file took 3.4 GB on the CPU): a longer input
    gets an error saying so instead of exhausting the memory. ``rescale_loud`` None reads audio as in training (float audio at
    integer scale refused, or rescaled when the model or cache was made with
    ``rescale_loud``); True or False decides here.
    """

    def __init__(self, model_dir=None, *, run=None, device: str = "auto", batch_size: int = 8,
                 max_seconds: Optional[float] = None, precision: str = "auto", num_workers: int = 0,
                 rescale_loud: Optional[bool] = None, max_whole_seconds: float = 120.0, transcripts=None,
                 asr=None):
        if (model_dir is None) == (run is None):
            raise ConfigError("predict from a finetune-best model directory or from a train-head run: give one "
                              "of the two")
        if transcripts is not None and asr is not None:
            raise ConfigError("--transcripts and --asr: give one of the two (a fusion run's text read from files, "
                              "or heard by a Whisper model)")
        for given, option in ((transcripts, "--transcripts"), (asr, "--asr")):
            if given is not None and run is None:
                raise ConfigError(f"{option}: only a fusion run (train-head over an audio and a text cache) reads "
                                  f"transcripts; a finetune-best model predicts from audio alone")
        self.device = resolve_device(device)
        loaded = (load_model_source(model_dir, device=self.device, precision=precision) if run is None
                  else load_run(run, device=self.device, precision=precision, fusion=True))
        for given, option in ((transcripts, "--transcripts"), (asr, "--asr")):
            if given is not None and not loaded.needs_text:
                raise ConfigError(f"{option}: run {run} is not a fusion run (its head reads audio alone); only a "
                                  f"fusion run (train-head --cache AUDIO --cache TEXT) reads transcripts")
        #: a fusion run's: each file's transcript is read from ``transcripts/<stem>.txt`` (None: the
        #: corpus layout, ``Transcripts/`` beside the ``Audios/`` folder holding the file)
        self.needs_text = loaded.needs_text
        self.transcripts = None if transcripts is None else Path(transcripts)
        #: ``--asr``: each file's text heard by this Whisper model (:class:`~conilium.extract.asr.Transcriber`,
        #: decoded as ``conilium corpus transcribe`` decodes) instead of read from a transcript file
        self.transcriber = None
        if asr is not None:
            from conilium.extract.asr import Transcriber

            # a model name or path (default decoding), or a Transcriber set up by the caller
            self.transcriber = asr if isinstance(asr, Transcriber) else Transcriber(str(asr), device=self.device)
        self.loaded = loaded
        self.model = loaded.model
        self.info = loaded.info
        self.classes = loaded.classes
        self.class_names = loaded.class_names
        self.attributes = loaded.attributes
        self.offsets = loaded.offsets
        self.loss = loaded.loss
        self.batch_size = max(1, int(batch_size))
        base = loaded.signal
        ms = base.max_seconds if max_seconds is None else max_seconds
        self.signal = SignalPath(max_seconds=float(ms) if ms else None, normalize=base.normalize, stats=base.stats,
                                 rescale_loud=base.rescale_loud if rescale_loud is None else bool(rescale_loud))
        self.max_seconds = self.signal.max_seconds
        self.max_whole_seconds = float(max_whole_seconds)
        self.precision = loaded.precision
        self.num_workers = num_workers
        self._min_samples = min_samples(self.model)

    def predict(self, inputs: Sequence, *, texts: Optional[Sequence[Optional[str]]] = None,
                progress: bool = False) -> List[FilePrediction]:
        """Results in the order of ``inputs``: audio file paths, or waveforms in memory — a numpy
        array of 16 kHz samples, ``(samples,)`` or ``(samples, channels)``, or a pair
        ``(samples, sample_rate)`` — which go through the same signal path as files.

        A fusion run also reads each input's transcript: ``texts[i]`` when given (not None), else
        the file's transcript (:func:`~conilium.transcripts.audio_transcript_path`); an input
        without one gets an error instead of a prediction."""
        plan = plan_inputs(inputs, self.classes, class_set_names=self.class_names, max_seconds=self.max_seconds,
                           max_whole_seconds=self.max_whole_seconds)
        names, waves, seconds, results, todo = plan.names, plan.waves, plan.seconds, plan.results, plan.todo
        extra = None
        if self.needs_text:
            if texts is not None and len(texts) != len(names):
                raise ConfigError(f"{len(texts)} text(s) for {len(names)} input(s): give one per input (None: its "
                                  f"transcript file)")
            ids = {}
            heard = self._heard(names, waves, texts, todo, results) if self.transcriber is not None else {}
            todo = [i for i in todo if results[i].error is None]
            for i in list(todo):
                try:
                    given = heard.get(i, None if texts is None else texts[i])
                    text = self._text(names[i], waves[i], given)
                except ConiliumError as e:
                    results[i].error = str(e)
                    continue
                ids[i] = self.model.token_ids(text)
            todo = [i for i in todo if i in ids]

            def tokens(idx: List[int]) -> tuple:
                return self.model.tokenize([ids[i] for i in idx])

            extra = tokens
        elif texts is not None:
            raise ConfigError("texts: only a fusion run reads transcripts")
        ds = AudioClips(names, [None] * len(names), signal=self.signal, durations=seconds,
                        min_samples=self._min_samples, waves=waves)

        def failed(i: int, error: AudioError) -> None:
            results[i].error = error.reason

        def peak(i: int, value: float) -> None:
            results[i].peak = value

        scores = predict_clips(self.model, ds, todo, self.loss, device=self.device,
                               batch_size=self.batch_size, precision=self.precision, num_workers=self.num_workers,
                               progress=progress, on_error=failed, on_peak=peak, extra=extra)
        fill_predictions(results, scores, self.classes, self.offsets, self.attributes)
        return results

    def _heard(self, names, waves, texts, todo: List[int], results) -> dict:
        """``--asr``: the texts of the files among ``todo`` that were given none, heard by the
        transcriber over the whole file (16 kHz mono); a file that cannot be read, or in which the
        model hears no words, gets its error in ``results``."""
        from conilium.audio import read_audio

        wanted, heard = [], {}
        for i in todo:
            if waves[i] is not None or (texts is not None and texts[i] is not None and str(texts[i]).strip()):
                continue  # a waveform in memory, or a text given: nothing to hear
            try:
                wanted.append((i, read_audio(names[i])))
            except AudioError as e:
                results[i].error = e.reason
        for at in range(0, len(wanted), self.batch_size):
            part = wanted[at:at + self.batch_size]
            for (i, _), text in zip(part, self.transcriber.transcribe([w for _, w in part])):
                if text:
                    heard[i] = text
                else:
                    results[i].error = (f"--asr {self.transcriber.asr} heard no words in {names[i]}; a fusion run "
                                        f"needs its text (give --transcripts)")
        return heard

    def _text(self, name: str, wave, given: Optional[str]) -> str:
        """The transcript of input ``name`` for a fusion run (a CorpusError saying why there is none)."""
        from conilium.errors import CorpusError
        from conilium.transcripts import audio_transcript_path, read_transcript

        if given is not None and " ".join(str(given).split()):
            return " ".join(str(given).split())
        if wave is not None:
            raise CorpusError(f"{name}: no transcript given for this waveform; a fusion run needs each input's "
                              f"text (pass texts=)")
        path = audio_transcript_path(name, self.transcripts)
        if not path.is_file():
            hint = ("" if self.transcripts is not None else
                    "; give --transcripts FOLDER holding <audio file stem>.txt")
            raise CorpusError(f"no transcript of {name}: {path} not found (a fusion run needs each file's "
                              f"transcript){hint}")
        return read_transcript(path, Path(name).name)

    def predict_segments(self, inputs: Sequence, segment: str = "vad", **options):
        """Each audio file of ``inputs`` cut into segments and each segment predicted
        (:func:`~conilium.finetune.segments.segment_and_predict`, its options)."""
        from .segments import segment_and_predict

        return segment_and_predict(self, inputs, segment, **options)
