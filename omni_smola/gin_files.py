"""Where a gin file name points: the search paths first, then the working directory.

gin resolves a relative name (`--gin_file=models/mini.gin`, `include 'runs/pretrain.gin'`)
against the working directory first, then as a Python package resource (`runs/pretrain.gin`
-> package `runs`), then against the search paths. Run from a directory that holds a `runs/`
or `models/` folder (the demo's own run directory, any ML project) and the middle step
either crashes (a namespace package has no origin) or finds another project's file.

`resolve` is the one rule the binaries use instead:

1. an absolute path, or one written `./x.gin` / `../x.gin`, is that file;
2. any other relative name is looked up in the search paths, in order
   (`--gin_search_paths`, default: this repository's `gin_configs/`), then in the working
   directory; the first file found wins, and a different file of the same name further down
   the list is named in a warning;
3. nothing found: `GinFileNotFoundError` naming the file and every place tried.

`install(search_paths)` makes gin use it for `--gin_file` and for `include` lines alike, by
putting a reader in front of gin's own.
"""
import os
from typing import List, Sequence

from absl import logging
import gin


class GinFileNotFoundError(FileNotFoundError):
  """A gin file that is in none of the places searched."""


_search_paths: List[str] = []


def resolve(name: str, search_paths: Sequence[str]) -> str:
  """The absolute path of gin file `name` (rules in the module docstring)."""
  expanded = os.path.expanduser(name)
  if os.path.isabs(expanded) or name.startswith(("./", "../")):
    candidates = [os.path.abspath(expanded)]
  else:
    candidates = [os.path.abspath(os.path.join(p, name)) for p in search_paths if p]
    candidates.append(os.path.abspath(name))
  found = [c for c in dict.fromkeys(candidates) if os.path.isfile(c)]
  if not found:
    raise GinFileNotFoundError(
        f"gin file {name!r} not found; tried: {', '.join(dict.fromkeys(candidates))}")
  for other in found[1:]:
    if not os.path.samefile(other, found[0]):
      logging.warning("gin file %r: using %s, not %s (search paths come before the working "
                      "directory; write ./%s for the latter)", name, found[0], other, name)
  return found[0]


def _exists(name: str) -> bool:
  # gin asks once per search prefix, starting with '' (the name itself): answering for the
  # bare name settles it, and a missing file stops the search here with the whole list.
  resolve(name, _search_paths)
  return True


def _open(name: str):
  return open(resolve(name, _search_paths))


def install(search_paths: Sequence[str]) -> None:
  """Makes gin resolve every file name, included or given, with `resolve`."""
  _search_paths[:] = [os.path.abspath(p) for p in search_paths if p]
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  # gin has no public way to put a reader first; the list is stable since gin-config 0.1.
  readers[:] = [(_open, _exists)] + [r for r in readers if r[0] is not _open]
