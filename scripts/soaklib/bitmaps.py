"""Operations on dirty bitmaps: add, remove, clear, enable/disable, merge.

Each runs with the clients paused, so the model knows exactly which changes come before
the command and which after (the server quiesces its own clients the same way).  A busy
bitmap (an incremental backup holds it) must refuse remove, clear, enable, disable and
merges; any other bitmap must accept them.
"""

from .bounds import Skip, Violation
from .model import BitmapModel
from .registry import op

MiB = 1 << 20
GRANULARITIES = (65536, 65536, 4096, MiB)
MAX_BITMAPS = 4


def _pick(soak, rnd):
    """A bitmap; mostly not the one an incremental chain follows (so chains grow long)."""
    names = sorted(soak.model.bitmaps)
    if not names:
        raise Skip("no bitmap")
    spare = soak.chain[0] if soak.chain is not None else None
    if spare in names and len(names) > 1 and rnd.random() < 0.8:
        names.remove(spare)
    return soak.model.bitmaps[rnd.choice(names)]


def _command(soak, bitmaps, command, args):
    """Run a command that touches `bitmaps`; refused exactly when one of them is busy."""
    ok, why = soak.try_qmp(command, args)
    busy = [b.name for b in bitmaps if b.busy]
    if ok and busy:
        raise Violation("%s succeeded on busy bitmap %s" % (command, busy[0]))
    if not ok and not busy:
        raise Violation("%s %s refused: %s" % (command, args, why))
    return ok


def _end_chain(soak, bitmap):
    """The bitmap stops covering every change (disabled, cleared, removed): no chain
    follows it, not even one whose backup is still running (ops._backup_ended)."""
    bitmap.breaks += 1
    if soak.chain is not None and soak.chain[0] == bitmap.name:
        soak.chain = None


def _freeze(soak, bitmap):
    """A disabled bitmap must keep what it holds now, exactly."""
    bitmap.exact = None if bitmap.recording else soak.bitmap_extents(bitmap.name)


@op(2)
def bitmap_add(soak, rnd):
    if len(soak.model.bitmaps) >= MAX_BITMAPS:
        raise Skip("%d bitmaps" % MAX_BITMAPS)
    name = soak.name("bm")
    bitmap = BitmapModel(name, soak.model.size, rnd.choice(GRANULARITIES),
                         persistent=rnd.random() < 0.6, recording=rnd.random() < 0.85)
    with soak.clients_paused():
        _command(soak, [], "block-dirty-bitmap-add",
                 {"node": "disk0", "name": name, "granularity": bitmap.granularity,
                  "persistent": bitmap.persistent, "disabled": not bitmap.recording})
        soak.model.bitmaps[name] = bitmap
        _freeze(soak, bitmap)
    return "add " + bitmap.describe()


@op(1)
def bitmap_remove(soak, rnd):
    bitmap = _pick(soak, rnd)
    with soak.clients_paused():
        if _command(soak, [bitmap], "block-dirty-bitmap-remove",
                    {"node": "disk0", "name": bitmap.name}):
            del soak.model.bitmaps[bitmap.name]
            _end_chain(soak, bitmap)
            return "remove " + bitmap.describe()
    return "remove %s: busy, refused" % bitmap.name


@op(1)
def bitmap_clear(soak, rnd):
    bitmap = _pick(soak, rnd)
    with soak.clients_paused():
        if _command(soak, [bitmap], "block-dirty-bitmap-clear",
                    {"node": "disk0", "name": bitmap.name}):
            bitmap.changes.clear()
            _end_chain(soak, bitmap)
            _freeze(soak, bitmap)
            return "clear " + bitmap.describe()
    return "clear %s: busy, refused" % bitmap.name


@op(1)
def bitmap_toggle(soak, rnd):
    bitmap = _pick(soak, rnd)
    command = "block-dirty-bitmap-" + ("disable" if bitmap.recording else "enable")
    with soak.clients_paused():
        if _command(soak, [bitmap], command, {"node": "disk0", "name": bitmap.name}):
            bitmap.recording = not bitmap.recording
            if not bitmap.recording:
                _end_chain(soak, bitmap)
            _freeze(soak, bitmap)
            return "%s %s" % (command.rsplit("-", 1)[1], bitmap.describe())
    return "%s %s: busy, refused" % (command, bitmap.name)


@op(1)
def bitmap_merge(soak, rnd):
    if len(soak.model.bitmaps) < 2:
        raise Skip("fewer than two bitmaps")
    names = sorted(soak.model.bitmaps)
    target = soak.model.bitmaps[rnd.choice(names)]
    sources = [soak.model.bitmaps[n] for n in rnd.sample(names, rnd.randint(1, len(names)))
               if n != target.name] or [soak.model.bitmaps[n] for n in names if n != target.name][:1]
    with soak.clients_paused():
        if _command(soak, [target] + sources, "block-dirty-bitmap-merge",
                    {"node": "disk0", "target": target.name,
                     "bitmaps": [s.name for s in sources]}):
            for s in sources:
                target.changes.update(s.changes)
                if s.exact is not None:          # what a disabled source holds, exactly
                    target.changes.update(_mask(soak, s.exact))
            _freeze(soak, target)
            return "merge %s into %s" % ([s.name for s in sources], target.describe())
    return "merge into %s: busy, refused" % target.name


def _mask(soak, extents):
    from .model import Mask
    return Mask.of(soak.model.size, extents)
