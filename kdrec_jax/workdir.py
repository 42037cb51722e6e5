"""A run's workdir: its lock, the config fingerprint, the frozen teachers' record, provenance, the
metrics and results writers, and reading what earlier runs left there (finished phases, a
teacher, a warm-up).

Layout: `<workdir>/config.json` (the config less its steering keys, and the data's hash),
`teacher.json` (each frozen teacher's source and params hash), `metrics.jsonl` (one JSON object
per line), `results.json` (written atomically), `checkpoints/<phase>/<epoch>` (orbax) and
`.lock`.
"""
from __future__ import annotations

import hashlib
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import checkpoint, faults


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked: busy, or written by another config or teacher."""


def jsonable(tree):
  """Plain JSON values: arrays as lists, NaN (an undefined mean, e.g. a popularity group without
  held-out items) as null."""
  def leaf(x):
    if isinstance(x, (str, bool, int)) or x is None:
      return x
    if np.ndim(x) == 0:
      x = float(x)
      return None if np.isnan(x) else x
    return [None if isinstance(v, float) and np.isnan(v) else v
            for v in np.asarray(x).tolist()]
  return jax.tree.map(leaf, tree)


class MetricWriter:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, **record) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(jsonable(record)) + "\n")


def write_json_atomic(path: str, obj) -> None:
  """Writes `obj` to `path` via a temporary file and a rename (process 0 only: in a multi-host
  run the others compute the same values and only read)."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(jsonable(obj), f, indent=2, sort_keys=True, allow_nan=False)
  faults.point("results")  # written, not yet in place
  os.replace(tmp, path)


def read_results(workdir: str) -> dict:
  """`<workdir>/results.json` ({} if there is none)."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def params_hash(tree) -> str:
  """sha256 of a params pytree's leaves (dtype, shape and bytes, in tree order)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    a = np.ascontiguousarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def data_hash(data) -> str:
  """sha256 of a dataset's sizes and its three CSR splits."""
  h = hashlib.sha256(f"{data.num_users} {data.num_items}".encode())
  for split in ("train", "val", "test"):
    for a in data.split(split):
      h.update(np.ascontiguousarray(a, np.int64).tobytes())
  return h.hexdigest()


def provenance(exp) -> dict:
  """What produced a result: library, JAX and Python versions, the devices, the data's content
  hash and the source revision when it is a git checkout."""
  import platform
  import subprocess
  import kdrec_jax
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                            capture_output=True, text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  devices = exp.mesh.devices.flatten().tolist()
  return {"kdrec_jax": kdrec_jax.__version__, "git_commit": commit, "jax": jax.__version__,
          "python": platform.python_version(), "backend": jax.default_backend(),
          "devices": [d.device_kind for d in devices], "processes": jax.process_count(),
          "host": platform.node(), "data_sha256": data_hash(exp.data)}


# Config keys that only steer a run (how long a call runs, logging, checkpoint cadence, the
# device count, chunk sizes, where the data and teachers live); the data and the teachers are
# checked by content instead. Any other difference refuses a resume.
STEERING_KEYS = frozenset({
    "max_epochs_per_run", "num_devices", "log_every", "checkpoint_every", "checkpoint_keep",
    "eval.chunk_size", "teacher_init", "force_resume", "data.path", "data.url", "data.cache_dir",
    "data.train", "data.val", "data.test", "method.refresh_chunk", "method.list_chunk"})


def _steering(key: str) -> bool:
  """Steering keys, and where each extra frozen teacher lives (`teachers.<name>.init`)."""
  return key in STEERING_KEYS or (key.startswith("teachers.") and key.endswith(".init"))


def _flat(tree, prefix="") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def check_config(workdir: str, config, data) -> list[str]:
  """Records the config (less the steering keys) and the data's hash in `<workdir>/config.json`
  on a fresh workdir; on a resume, refuses (WorkdirError, naming the differing keys) a different
  one, unless `config.force_resume`, which records the new one and returns the differences."""
  path = os.path.join(workdir, "config.json")
  record = {"config": {k: v for k, v in _flat(config.to_dict()).items() if not _steering(k)},
            "data_sha256": data_hash(data)}
  diffs = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    # Keys in only one of the two come from a library version that added or removed them.
    keys = sorted(set(old["config"]) & set(record["config"]))
    diffs = [f"{k}: {old['config'][k]!r} -> {record['config'][k]!r}"
             for k in keys if old["config"][k] != jsonable(record["config"][k])]
    if old["data_sha256"] != record["data_sha256"]:
      diffs.append("the data (its content hash differs)")
    if diffs and not config.get("force_resume", False):
      raise WorkdirError(f"{workdir} was written by another config ({'; '.join(diffs)}); use a "
                         "new workdir, or --config.force_resume=True to continue with this one")
    if not diffs:
      return []
    logging.warning("force_resume: continuing %s with a changed config: %s", workdir,
                    "; ".join(diffs))
  elif os.path.exists(os.path.join(workdir, "checkpoints")):
    logging.warning("%s has checkpoints but no config.json (an older workdir): resuming without "
                    "a config check", workdir)
  write_json_atomic(path, record)
  return diffs


def check_teachers(workdir: str, sources: dict, params: dict) -> dict:
  """Records which frozen teachers ({name: source}, {name: params}) this workdir distils from;
  a different one is an error. Returns the record: the primary teacher's {'source', 'sha256'},
  plus {'others': {name: {...}}} when a method has several."""
  def entry(name):
    return {"source": sources[name], "sha256": params_hash(params[name])}
  record = entry("teacher")
  others = {n: entry(n) for n in sorted(params) if n != "teacher"}
  if others:
    record["others"] = others
  path = os.path.join(workdir, "teacher.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for name, new in [("teacher", record), *others.items()]:
      was = old if name == "teacher" else old.get("others", {}).get(name)
      if was is not None and was["sha256"] != new["sha256"]:
        raise WorkdirError(f"{workdir} was distilled from the {name} {was['source']} (sha256 "
                           f"{was['sha256'][:12]}...), but this run's {name} is {new['source']} "
                           f"(sha256 {new['sha256'][:12]}...); use a new workdir")
  write_json_atomic(path, record)
  return record


class WorkdirLock:
  """An exclusive lock on `<workdir>/.lock` for one run's lifetime (released by the OS when the
  process dies, so a killed run never leaves the workdir locked)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")

  def __enter__(self):
    import fcntl
    self.file = open(self.path, "a+")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self.file.seek(0)
      owner = self.file.read().strip() or "another process"
      self.file.close()
      raise WorkdirError(f"{os.path.dirname(self.path)} is in use by a running run ({owner}); "
                         "wait for it or use another workdir") from None
    self.file.seek(0)
    self.file.truncate()
    self.file.write(f"pid {os.getpid()}\n")
    self.file.flush()
    return self

  def __exit__(self, *exc):
    self.file.close()


# ---------------------------------------------------------------------------------------------
# What earlier runs left: finished phases, their params, teachers and warm-ups.
# ---------------------------------------------------------------------------------------------

def phase_checkpoints(workdir: str, phase: str, **kw) -> checkpoint.PhaseCheckpoints:
  return checkpoint.PhaseCheckpoints(os.path.join(workdir, "checkpoints"), phase, **kw)


def phase_result_params(workdir: str, phase: str, epoch: int | None = None) -> dict:
  """{learner: params} a phase in `workdir` ended with (its best state when it stopped early),
  read from its latest checkpoint (or the one at `epoch`) as saved."""
  raw = phase_checkpoints(workdir, phase).restore_raw(epoch)
  if "best" in raw and epoch is None:
    return dict(raw["best"]["params"])
  return {k: v["params"] for k, v in raw.items() if isinstance(v, dict) and "params" in v}


def finished_phases(workdir: str) -> dict:
  return read_results(workdir).get("phases", {})


def finished_warmup(path: str, epochs: int):
  """(params, results) of the finished `epochs`-epoch warm-up in the workdir `path`."""
  ckpt = phase_checkpoints(path, "warmup")
  phases = finished_phases(path)
  done = "warmup" in phases and (ckpt.latest_epoch() == epochs
                                 or phases["warmup"].get("stopped_early"))
  if not done:
    raise FileNotFoundError(f"warmup_from: {path} holds no finished {epochs}-epoch warm-up "
                            f"(results.json phases {sorted(phases)}, latest warm-up checkpoint "
                            f"{ckpt.latest_epoch()})")
  logging.info("Starting from the warm-up in %s.", path)
  return phase_result_params(path, "warmup"), phases["warmup"]


def _workdir_teacher(path: str, what: str, epoch: int | None):
  phases = finished_phases(path)
  if "warmup" not in phases:
    raise FileNotFoundError(f"{what}: {path} has no finished warm-up (results.json phases "
                            f"{sorted(phases)})")
  ckpt = phase_checkpoints(path, "warmup")
  if epoch is not None and epoch not in ckpt.all_epochs():
    raise FileNotFoundError(f"{what}: {path} kept no warm-up checkpoint at epoch {epoch} (it has "
                            f"{sorted(ckpt.all_epochs())}; set warmup.keep_epochs when training "
                            "the teacher)")
  trained = ckpt.latest_epoch()
  params = (phase_result_params(path, "warmup", epoch).get("teacher") if trained is not None
            else None)
  if params is None:
    raise FileNotFoundError(f"{what}: the warm-up in {path} did not train a teacher")
  return params


def load_teacher(path: str, like, what: str = "teacher_init", epoch: int | None = None):
  """A teacher's params from `path`: a workdir with a finished warm-up that trained the teacher
  (its best state if it stopped early, or its checkpoint at `epoch`), or a params directory
  written by `checkpoint.save_params`. Checked against the structure of `like`."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    params = _workdir_teacher(path, what, epoch)
  elif checkpoint.is_params_dir(path) and epoch is None:
    params = checkpoint.load_params(path)
  else:
    raise FileNotFoundError(f"{what}: {path} is neither a workdir (no checkpoints/) nor a "
                            "params directory (see kdrec_jax.checkpoint.save_params)"
                            + (f" (epoch {epoch} needs a workdir)" if epoch is not None else ""))
  want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), like)
  got = jax.tree.map(lambda x: (tuple(np.shape(x)), str(np.asarray(x).dtype)), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ValueError(f"{what}: the params in {path} do not fit the configured teacher "
                     f"(expected {want}, found {got})")
  return jax.tree.map(jnp.asarray, params)
