"""Test-only: with this folder on PYTHONPATH and ROW_TRACE_DIR set, every training loader (data/loader.py) appends
the global rows of each micro-batch it yields to ROW_TRACE_DIR/rows-w<world>-r<rank>.jsonl, so a test counts the
samples a run read from the loader itself (tests/test_elastic_resume.py). Validation loaders (drop_last=False) are
left out. Python imports sitecustomize at start-up; the loader is patched when a process first imports it."""
import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path

TRACE_DIR = os.environ.get("ROW_TRACE_DIR")


def _patch(module) -> None:
    iterate = module.BatchLoader.iterate

    def traced(self, epoch, start_batch=0):
        path = Path(TRACE_DIR) / f"rows-w{self.world_size}-r{self.rank}.jsonl"
        rows = self.batches(epoch)[start_batch:]
        for index, batch in enumerate(iterate(self, epoch, start_batch)):
            if self.drop_last:
                with path.open("a") as trace:
                    trace.write(json.dumps({"epoch": epoch, "rows": rows[index].tolist()}) + "\n")
            yield batch

    module.BatchLoader.iterate = traced


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "data.loader":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if TRACE_DIR:
    sys.meta_path.insert(0, _PatchOnImport())
