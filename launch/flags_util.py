"""Command-line parsing for the absl launchers: config-file and override mistakes end in one line
that names the key or argument and what is valid, not in a traceback."""
import difflib
import importlib.util
import sys

from absl import flags


def _load_config(spec: str):
  """`get_config(arg)` of the config file named by `--config=path[:arg]`, without overrides."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_launcher_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _explain_override(argv, error: Exception) -> str:
  """Which `--config.a.b=...` override names no config key, and the closest valid keys."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv:
    spec = argv[argv.index("--config") + 1]
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  try:
    config = _load_config(spec)
  except Exception:  # noqa: BLE001 - the file's own error is reported elsewhere
    return f"bad config override ({error})"
  for name in overrides:
    node, parts = config, name.split(".")
    for i, part in enumerate(parts):
      if hasattr(node, "keys") and part in node:
        node = node[part]
        continue
      here = ".".join(parts[:i]) or "the config"
      valid = sorted(node.keys()) if hasattr(node, "keys") else []
      close = difflib.get_close_matches(part, valid, n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      return (f"unknown config key --config.{name}: {here} has no {part!r}{hint} (valid: "
              f"{', '.join(valid)})")
  return f"bad config override ({error})"


# Run-control keys a config file need not declare: `--config.<key>=<bool>` adds them.
RUN_KEYS = ("force_resume",)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _pop_run_keys(argv) -> tuple[list, dict]:
  """(argv without the RUN_KEYS overrides, {key: bool}); a value that is no boolean exits."""
  rest, found, args = [], {}, list(argv)
  while args:
    arg = args.pop(0)
    name, eq, value = arg.partition("=")
    key = name[len("--config."):] if name.startswith("--config.") else None
    if key not in RUN_KEYS:
      rest.append(arg)
      continue
    if not eq and args and args[0].strip().lower() in _TRUE + _FALSE:
      eq, value = "=", args.pop(0)  # the space-separated form: --config.force_resume True
    value = value.strip().lower() if eq else "true"
    if value not in _TRUE + _FALSE:
      sys.exit(f"error: bad config override: --config.{key} takes True or False, got {value!r}")
    found[key] = value in _TRUE
  return rest, found


def _literal(text: str):
  """A grid value: an int, a float, True/False, or the text itself."""
  import ast
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return value if isinstance(value, (int, float, bool)) else text


def _pop_runs(argv) -> tuple[list, dict]:
  """(argv without the `--config.runs.*` overrides, the runs they ask for): `--config.runs.seeds=
  0,1,2` and `--config.runs.grid.<dotted key>=v1,v2,...` (kdrec_jax.runs), which a config file
  need not declare; `--config.runs.budget_mb=N` bounds their memory."""
  rest, runs = [], {}
  for arg in argv:
    name, eq, value = arg.partition("=")
    if not name.startswith("--config.runs.") or not eq:
      rest.append(arg)
      continue
    key = name[len("--config.runs."):]
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
      if key == "seeds":
        runs["seeds"] = tuple(int(v) for v in items)
      elif key == "budget_mb":
        runs["budget_mb"] = float(value)
      elif key.startswith("grid.") and items:  # nested as the config: grid.method.lambda_kd
        *parents, leaf = key[len("grid."):].split(".")
        node = runs.setdefault("grid", {})
        for part in parents:
          node = node.setdefault(part, {})
        node[leaf] = tuple(_literal(v) for v in items)
      else:
        raise ValueError(key)
    except ValueError:
      sys.exit(f"error: bad config override {arg!r}: expected --config.runs.seeds=0,1,2, "
               "--config.runs.grid.<key>=v1,v2 or --config.runs.budget_mb=N")
  return rest, runs


def parse_flags(argv):
  """`flags_parser` for `absl.app.run`: absl's parsing, with one-line errors."""
  argv, run_keys = _pop_run_keys(argv)
  argv, runs = _pop_runs(argv)
  sys.argv[:] = _pop_runs(_pop_run_keys(sys.argv)[0])[0]  # config_flags reads sys.argv too
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is not None:
      config.keys()  # a config file that failed to load only raises when first read
      with config.unlocked():  # config_flags locks the config against new keys
        for key, value in run_keys.items():
          config[key] = value
        if runs:
          import ml_collections
          config["runs"] = ml_collections.ConfigDict(runs)
    return rest
  except OSError as e:
    sys.exit(f"error: cannot load the config file: {str(e).strip().splitlines()[-1].strip()}")
  except flags.Error as e:  # includes errors raised by the config file's get_config
    message = str(e).strip()
    if "Traceback" in message:  # ml_collections embeds the config file's traceback: keep its
      message = message.splitlines()[-1]  # last line, the error itself
    sys.exit(f"error: {message}")
  except (AttributeError, KeyError) as e:  # a --config.x override that names no key
    sys.exit(f"error: {_explain_override(argv, e)}")
  except (ValueError, TypeError) as e:  # an override value of the wrong type
    sys.exit(f"error: bad config override: {e}")

