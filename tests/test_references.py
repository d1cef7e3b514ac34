"""Every `module.name` written for a pausejax module names something that module defines.

Read from the source, without importing it: the experiment runners only use each other in
subprocess runs (the slow set), so a renamed helper would otherwise fail first there; and a
test that stubs `module.old_name = fake` after a rename would silently stub nothing.
"""

import ast
import functools
import os

from conftest import REPO

PACKAGE = "pausejax"


@functools.cache
def _module_path(dotted: str) -> str | None:
  base = os.path.join(REPO, *dotted.split("."))
  if os.path.isfile(base + ".py"):
    return base + ".py"
  if os.path.isfile(os.path.join(base, "__init__.py")):
    return os.path.join(base, "__init__.py")
  return None


@functools.cache
def _top_level_names(path: str) -> set[str] | None:
  """Names bound at module level; None when the module can bind names dynamically."""
  tree = ast.parse(open(path).read())
  names: set[str] = set()

  def bind(target):
    for node in ast.walk(target):
      if isinstance(node, ast.Name):
        names.add(node.id)

  def visit(statements):
    for s in statements:
      if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        if s.name == "__getattr__":
          raise LookupError
        names.add(s.name)
      elif isinstance(s, ast.Assign):
        for t in s.targets:
          bind(t)
      elif isinstance(s, (ast.AnnAssign, ast.AugAssign)):
        bind(s.target)
      elif isinstance(s, (ast.Import, ast.ImportFrom)):
        for a in s.names:
          if a.name == "*":
            raise LookupError
          names.add(a.asname or a.name.split(".")[0])
      elif isinstance(s, ast.If):
        visit(s.body)
        visit(s.orelse)
      elif isinstance(s, ast.Try):
        visit(s.body)
        visit(s.orelse)
        visit(s.finalbody)
        for h in s.handlers:
          visit(h.body)
      elif isinstance(s, ast.With):
        visit(s.body)

  try:
    visit(tree.body)
  except LookupError:
    return None
  if os.path.basename(path) == "__init__.py":  # Submodules are attributes of their package.
    folder = os.path.dirname(path)
    names |= {f[:-3] for f in os.listdir(folder) if f.endswith(".py")}
    names |= {d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "__init__.py"))}
  return names


def _aliases(nodes: list[ast.AST]) -> dict[str, str]:
  """Local name -> dotted pausejax module, for the file's imports (module level or in functions).

  A name bound to different modules in different places is left out.
  """
  found: dict[str, set[str]] = {}
  for node in nodes:
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith(PACKAGE + ".") and a.asname:
          found.setdefault(a.asname, set()).add(a.name)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == PACKAGE or node.module.startswith(PACKAGE + "."):
        for a in node.names:
          dotted = node.module + "." + a.name
          if _module_path(dotted):
            found.setdefault(a.asname or a.name, set()).add(dotted)
  return {alias: modules.pop() for alias, modules in found.items() if len(modules) == 1}


def _sources():
  for top in (PACKAGE, "tests"):
    for folder, _, files in os.walk(os.path.join(REPO, top)):
      for f in sorted(files):
        if f.endswith(".py"):
          yield os.path.join(folder, f)


def _unresolved(path: str) -> list[str]:
  nodes = list(ast.walk(ast.parse(open(path).read())))
  aliases = _aliases(nodes)
  shadowed = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
              and n.id in aliases}
  missing = []
  for node in nodes:
    if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
      continue
    alias = node.value.id
    if alias not in aliases or alias in shadowed:
      continue
    dotted = aliases[alias]
    names = _top_level_names(_module_path(dotted))
    if names is not None and node.attr not in names:
      missing.append((node.lineno, f"{dotted}.{node.attr}"))
  return [f"{os.path.relpath(path, REPO)}:{line}: {name}" for line, name in sorted(missing)]


def test_every_reference_to_a_pausejax_module_names_something_it_defines():
  missing = [m for path in _sources() for m in _unresolved(path)]
  assert not missing, "\n".join(missing)


def test_the_check_finds_a_renamed_helper_called_or_stubbed(tmp_path):
  source = tmp_path / "user.py"
  source.write_text("from pausejax.experiments import ablation\n"
                    "ablation.train_or_reuse(1, 2)\n"
                    "ablation._train(1, 2)\n"
                    "ablation._old_helper = print\n")
  found = [m.split(":", 1)[1] for m in _unresolved(str(source))]
  assert found == ["3: pausejax.experiments.ablation._train",
                   "4: pausejax.experiments.ablation._old_helper"]


def test_module_level_names_are_read_from_the_source():
  names = _top_level_names(_module_path("pausejax.experiments.ablation"))
  assert {"train_or_reuse", "PRETRAIN_STEPS", "main", "flags"} <= names
  assert "_train" not in names
  assert "ablation" in _top_level_names(_module_path("pausejax.experiments"))
