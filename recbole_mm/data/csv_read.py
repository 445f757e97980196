"""pandas' C parser for RecBole's ``.inter`` reads, with RecBole's values.

RecBole 1.2.1 reads atomic files with pandas' Python parser (~20 s per million rows on a 2-core machine: about an
hour for PixelRec's 158M rows). :meth:`recbole_mm.data.dataset.MMDatasetMixin._load_feat` reads ``.inter`` files
through :func:`read_csv_c` instead: the C parser tokenises, and float columns are converted the way the Python
parser converts them (:class:`PythonEngineFloats`), so the DataFrame is RecBole's bit for bit.

It relies on two pandas internals the Python parser itself uses (``pandas._libs.lib.maybe_convert_numeric`` and
``pandas._libs.parsers.STR_NA_VALUES``, pandas 2.x; RecBole 1.2.1 needs pandas < 3). The tests in
``tests/test_data_hardening.py`` compare against the Python parser and fail if a pandas release changes them.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import numpy as np

from recbole_mm.utils import ThreadFlag

_C_PARSER_THREAD = ThreadFlag()  # on: this thread is reading a .inter file (c_parser_for_this_thread)
_INSTALL_LOCK = threading.Lock()


@contextlib.contextmanager
def c_parser_for_this_thread():
    """While inside, ``read_csv`` calls of RecBole's dataset module made by this thread go through
    :func:`read_csv_c`; other threads' reads (any dataset class) are untouched."""
    _install_c_parser_pandas()
    with _C_PARSER_THREAD.on():
        yield


def _install_c_parser_pandas() -> None:
    """Make ``pd`` of RecBole's dataset module a :class:`CParserPandas` (once per process, idempotent)."""
    import recbole.data.dataset.dataset as recbole_dataset

    with _INSTALL_LOCK:
        if not isinstance(recbole_dataset.pd, CParserPandas):
            recbole_dataset.pd = CParserPandas(recbole_dataset.pd)


class CParserPandas:
    """``pandas`` as RecBole's dataset module sees it: everything is pandas', except that ``read_csv`` called by a
    thread inside :meth:`~recbole_mm.data.dataset.MMDatasetMixin._load_feat` (a ``.inter`` file) uses the C parser
    (:func:`read_csv_c`). In any other thread, or outside that method, ``read_csv`` is pandas' own, with the
    caller's arguments."""

    def __init__(self, pandas):
        self._pandas = pandas

    def __getattr__(self, name):
        return getattr(self._pandas, name)

    def read_csv(self, *args, **kwargs):
        if not _C_PARSER_THREAD:
            return self._pandas.read_csv(*args, **kwargs)
        return read_csv_c(self._pandas, args, kwargs)


_CHUNK_ROWS = 1_000_000  # rows per C-parser chunk: float columns are strings for one chunk at a time


def read_csv_c(pandas, args, kwargs):
    """``pandas.read_csv(*args, **kwargs)`` of RecBole's loader (``engine='python'``), through the C parser: the
    same DataFrame. Float columns (``dtype`` ``float64``) are read as strings, a chunk of rows at a time, and
    converted the way the Python parser converts them (:class:`PythonEngineFloats`); the C parser's own number
    parsing differs: ``1e400`` is an error there, ``-0`` is -0.0 where the Python parser makes 0.0 (a column of
    integers), 17-digit values round differently (one in five of ``repr(random.random())``). A column that this
    conversion does not reproduce (booleans, errors) makes the file be read by RecBole's own call."""
    dtype = dict(kwargs.get("dtype") or {})
    floats = [k for k, v in dtype.items() if v is np.float64]  # RecBole: np.float64 for float fields, str else
    if floats and not _pandas_conversion_reproduced(pandas):
        return pandas.read_csv(*args, **kwargs)
    fast = dict(kwargs, engine="c", dtype={k: (str if k in floats else v) for k, v in dtype.items()})
    fast.pop("float_precision", None)
    fast.pop("chunksize", None)
    source = args[0] if args else kwargs.get("filepath_or_buffer")
    converters = {k: PythonEngineFloats() for k in floats}
    parts, columns = [], None
    with pandas.read_csv(*args, **fast, chunksize=_CHUNK_ROWS) as reader:
        for chunk in reader:
            columns = list(chunk.columns)
            for k, conv in converters.items():
                if k in chunk.columns:
                    conv.add(chunk[k].to_numpy(dtype=object))
            parts.append(chunk.drop(columns=[k for k in floats if k in chunk.columns]))
    if columns is None:  # no rows: the one-shot read (nothing to convert)
        df = pandas.read_csv(*args, **fast)
        return df.astype({k: np.float64 for k in floats if k in df.columns})
    df = pandas.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    del parts
    for k in [c for c in columns if c in converters]:  # file order: each column back at its own position
        values = converters[k].result()
        if values is _AGAIN:  # every value through float(): the column's strings once more
            values = _float_strings(pandas, args, fast, k)
        if values is None:
            logging.getLogger().info(f"column {k} of {source}: values the fast reader does not convert; reading the "
                                     "file with pandas' Python parser (RecBole's)")
            return pandas.read_csv(*args, **kwargs)
        df.insert(columns.index(k), k, values)
    return df


_AGAIN = object()


class PythonEngineFloats:
    """The float64 column pandas' Python parser makes of a column's tokens, fed a chunk at a time (``add``: an
    object array as the C parser returns it with ``dtype=str``: strings, NaN for the NA tokens).

    The Python parser (pandas 2.x ``ParserBase._infer_types`` then ``_cast_types``) runs
    ``lib.maybe_convert_numeric`` on the whole column: integers when every value is one (then cast to float: ``-0``
    is 0.0), else pandas' ``precise_xstrtod`` of each value (not always the nearest double: '0.30000000000000004'
    gives 0.3); when a value defeats it (``1e400``, ``NAN``, ``+nan``, ``1_000``), it casts every string of the
    column with Python's ``float``. Here each chunk goes through the same call; :meth:`result` then picks what the
    call on the whole column would have given: the integers, the ``precise_xstrtod`` values, ``_AGAIN``
    (``float()`` of every string: read them again) or ``None`` (a path not reproduced: the caller reads the file
    with the Python parser)."""

    def __init__(self):
        self.floats = []  # per chunk: the precise_xstrtod reading
        self.int_fixes = []  # per chunk: None (not all integers), or (positions, values) where the integer reading
        self.route = "numeric"  # differs from it; route: or "float()" or "unsupported"

    def add(self, values: np.ndarray) -> None:
        if self.route != "numeric":
            return
        try:
            result = _convert_numeric(values)
        except ValueError:  # a value maybe_convert_numeric rejects: the Python parser's float() route
            self.route, self.floats, self.int_fixes = "float()", [], []
            return
        except TypeError:
            self.route, self.floats, self.int_fixes = "unsupported", [], []
            return
        if result.dtype.kind == "f" and not _beyond_int64(result):
            self.floats.append(result)
            self.int_fixes.append(None)
        elif result.dtype.kind == "i":  # this chunk all integers: keep both readings until the column is known
            floats = result.astype(np.float64)  # the integer reading; the xstrtod one is the same number except
            check = np.flatnonzero((result == 0) | (result > 2 ** 53) | (result < -2 ** 53))  # maybe '-0', > 2**53
            fix = (check, floats[check].copy())
            if len(check):
                with_float = np.append(values[check], np.array([0.5], dtype=object))  # one float: xstrtod route
                floats[check] = _convert_numeric(with_float)[:-1]
            self.floats.append(floats)
            self.int_fixes.append(fix)
        else:
            # uint64 integers (beside negative integers or NA, the whole column would come back as strings), or
            # object, bool: not reproduced
            self.route, self.floats, self.int_fixes = "unsupported", [], []

    def result(self):
        if self.route == "float()":
            return _AGAIN
        if self.route != "numeric":
            return None
        if not self.floats:
            return np.zeros(0, dtype=np.float64)
        integers = all(fix is not None for fix in self.int_fixes)  # the whole column: integers only
        for floats, fix in zip(self.floats, self.int_fixes):
            if integers:
                floats[fix[0]] = fix[1]
        out = np.concatenate(self.floats) if len(self.floats) > 1 else self.floats[0]
        self.floats, self.int_fixes = [], []
        return out


def _beyond_int64(values: np.ndarray) -> bool:
    """Whether finite values reach 2**63 in magnitude (integers there are uint64 / overflow cases for pandas)."""
    finite = np.abs(values[np.isfinite(values)])
    return bool(len(finite)) and bool(finite.max() >= 2.0 ** 63)


def _convert_numeric(values: np.ndarray) -> np.ndarray:
    from pandas._libs import lib
    from pandas._libs.parsers import STR_NA_VALUES

    na_values = set(STR_NA_VALUES) | {np.nan}  # the Python parser's na_values | na_fvalues (defaults)
    return lib.maybe_convert_numeric(values, na_values, False)[0]


_PROBE = None  # whether this pandas' internals convert as its Python parser does (checked once per process)


def _pandas_conversion_reproduced(pandas) -> bool:
    """The pandas internals :class:`PythonEngineFloats` calls still give the Python parser's values: checked once on
    values where the paths differ (xstrtod rounding, ``-0`` among integers, ``1e400``). When they do not (a pandas
    release moved or changed them), every ``.inter`` is read by RecBole's own call (slow, never wrong)."""
    global _PROBE
    if _PROBE is None:
        import io

        tokens = {"a": ["0.30000000000000004", "2"], "b": ["-0", "3"], "c": ["1e400", "1"]}
        text = "a,b,c\n" + "\n".join(",".join(row) for row in zip(*tokens.values())) + "\n"
        try:
            expected = pandas.read_csv(io.StringIO(text), engine="python", dtype=np.float64)
            ok = True
            for k, values in tokens.items():
                conv = PythonEngineFloats()
                conv.add(np.array(values, dtype=object))
                got = conv.result()
                if got is _AGAIN:
                    got = np.array(values, dtype=object).astype(np.float64)
                want = expected[k].to_numpy()
                ok = ok and got is not None and np.array_equal(got.view(np.int64), want.view(np.int64))
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            logging.getLogger().debug(f"pandas conversion probe failed: {type(e).__name__}: {e}")
            ok = False
        if not ok:
            logging.getLogger().warning("this pandas converts numbers differently from what recbole_mm reproduces: "
                                        ".inter files are read with RecBole's own (slow) reader")
        _PROBE = ok
    return _PROBE


def _float_strings(pandas, args, fast, column):
    """Python's ``float`` of every string of ``column`` (NA: NaN), as the Python parser casts a column that
    ``maybe_convert_numeric`` rejected; ``None`` for booleans (pandas infers them) or a value ``float`` rejects."""
    import io

    if not args or isinstance(args[0], io.IOBase):
        return None  # a stream cannot be read twice
    fast = dict(fast, usecols=[column], dtype={column: str})
    out = []
    try:
        with pandas.read_csv(*args, **fast, chunksize=_CHUNK_ROWS) as reader:
            for chunk in reader:
                values = chunk[column].to_numpy(dtype=object)
                if any(isinstance(v, str) and v.strip().lower() in ("true", "false") for v in values):
                    return None
                out.append(values.astype(np.float64))
    except (ValueError, TypeError):
        return None
    return np.concatenate(out)
