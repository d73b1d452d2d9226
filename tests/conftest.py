"""Test order: the files that start many launcher runs go first; one torch thread per test process.

`make test` runs one pytest-xdist worker per core and hands each a whole file; the file started last decides when the
suite ends, so a minutes-long file collected last (alphabetically, test_slurm.py) would run alone while the other
cores idle. The Makefile passes --no-loadscope-reorder: by default xdist hands out the files with the most tests first,
which left test_preemption (3 tests, six launcher runs) running alone at the end.
"""

import torch

# Two xdist workers share two cores with the runs they start: more threads than free cores spin at OpenMP barriers.
torch.set_num_threads(1)

SLOW_FILES_FIRST = ["test_slurm.py", "test_resume_and_chain.py", "test_elastic_resume.py", "test_preemption.py",
                    "test_rl.py", "test_distributed_metrics.py", "test_preference_runs.py", "test_fsdp.py",
                    "test_reliability.py", "test_run_dir.py", "test_compile.py", "test_packed_pairs.py",
                    "test_metric_edges.py", "test_precision.py", "test_gpu_check.py"]


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES_FIRST)))  # stable: file order kept within
