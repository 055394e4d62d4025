"""Errors come back whole from worker processes (grid workers, predict and extraction jobs send
them pickled): the same class, message and attributes, for every error conilium raises."""

import importlib
import inspect
import pickle
import signal

import pytest

from conilium.errors import ConiliumError
from conilium.locking import Stopped

#: the modules that define error classes beside conilium.errors
MODULES = ["conilium.errors", "conilium.dirs", "conilium.finetune.config", "conilium.study.steps"]


def error_classes():
    for m in MODULES:
        importlib.import_module(m)
    seen, todo = [], [ConiliumError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def example(cls):
    """An instance of ``cls`` made from strings, one a parameter of its constructor."""
    if cls.__init__ is Exception.__init__:
        return cls("clip A_0001 (Audios/A_0001.wav): cannot be read")
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    return cls(*[f"{p.name} of the example" for p in params])


def test_every_error_class_is_found():
    names = {cls.__name__ for cls in error_classes()}
    assert {"AudioError", "OutputError", "CacheError", "RunError", "FinetuneError", "StepFailed"} <= names


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_an_error_comes_back_from_pickle_whole(cls):
    e = example(cls)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e) and vars(back) == vars(e)


def test_a_stopped_run_comes_back_as_stopped():
    # a grid worker's Stopped that could not be rebuilt in the grid marked its worker pool broken:
    # the other workers were killed before they released their locks
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        back = pickle.loads(pickle.dumps(Stopped(signum)))
        assert type(back) is Stopped and back.signum == signum and str(back) == signal.Signals(signum).name
