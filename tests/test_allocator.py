"""The entry point's allocator choice (prefopt._alloc.use_allocator): which environment it re-executes with, that the
re-executed process is the same process with the same arguments and happens once, and the one-line error for a
choice it cannot honour."""

import os
import subprocess
import sys

import pytest

from prefopt import _alloc
from prefopt._alloc import ALLOCATOR_ENV, AllocatorError, allocator_env

JE = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def test_auto_preloads_jemalloc_where_found_and_keeps_the_users_preloads():
    env = allocator_env({"PATH": "/bin"}, JE, "linux")
    assert env["LD_PRELOAD"] == JE and env["PATH"] == "/bin" and env[_alloc._REEXEC_MARK] == "1"
    assert "MALLOC_CONF" not in env  # jemalloc's own defaults (see prefopt._alloc)
    env = allocator_env({"LD_PRELOAD": "/lib/libfoo.so", "MALLOC_CONF": "narenas:1"}, JE, "linux")
    assert env["LD_PRELOAD"] == f"{JE} /lib/libfoo.so" and env["MALLOC_CONF"] == "narenas:1"  # the user's wins
    assert allocator_env({ALLOCATOR_ENV: " JeMalloc "}, JE, "linux")["LD_PRELOAD"] == JE


@pytest.mark.parametrize("environ, found, platform", [
    ({}, None, "linux"),                                  # auto, nothing installed: the system malloc
    ({ALLOCATOR_ENV: "system"}, JE, "linux"),             # asked for the system malloc
    ({_alloc._REEXEC_MARK: "1"}, JE, "linux"),            # already re-executed (even if the preload failed)
    ({"LD_PRELOAD": JE}, JE, "linux"),                    # the user preloaded jemalloc
    ({}, JE, "darwin"),                                   # LD_PRELOAD is Linux's
])
def test_runs_as_it_is(environ, found, platform):
    assert allocator_env(environ, found, platform) is None


@pytest.mark.parametrize("environ, found, message", [
    ({ALLOCATOR_ENV: "jemalloc"}, None, "no libjemalloc.so.2 found"),
    ({ALLOCATOR_ENV: "tcmalloc"}, JE, "expected auto, jemalloc or system"),
])
def test_a_choice_it_cannot_honour_is_an_error(environ, found, message):
    with pytest.raises(AllocatorError, match=message):
        allocator_env(environ, found, "linux")


@pytest.mark.skipif(sys.platform != "linux", reason="re-execution with LD_PRELOAD is Linux's")
def test_the_process_re_executes_itself_once_with_the_same_pid_and_arguments():
    # a harmless library stands in for jemalloc: what is checked is the exec, not the allocator
    libm = "/lib/x86_64-linux-gnu/libm.so.6" if os.path.exists("/lib/x86_64-linux-gnu/libm.so.6") else "libm.so.6"
    code = ("import os, sys; from prefopt import _alloc; "
            "print(os.getpid(), os.environ.get(_alloc._REEXEC_MARK), os.environ.get('LD_PRELOAD'), sys.argv[1:], flush=True); "
            f"_alloc.find_jemalloc = lambda: {libm!r}; _alloc.use_allocator(); print('ran', flush=True)")
    env = {k: v for k, v in os.environ.items() if k not in (ALLOCATOR_ENV, _alloc._REEXEC_MARK, "LD_PRELOAD")}
    res = subprocess.run([sys.executable, "-c", code, "arg1", "two words"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    first, second, ran = res.stdout.splitlines()
    assert first.split()[:3] == [first.split()[0], "None", "None"] and "['arg1', 'two words']" in first
    assert second.split()[0] == first.split()[0] and second.split()[1:3] == ["1", libm]  # same pid, preloaded
    assert "['arg1', 'two words']" in second and ran == "ran"


def test_the_entry_point_maps_a_bad_choice_to_one_line_and_exit_1():
    res = subprocess.run([sys.executable, "-m", "prefopt", "config", "--preset", "smoke"], capture_output=True,
                         text=True, env={**os.environ, ALLOCATOR_ENV: "tcmalloc"}, timeout=60)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [f"error: {ALLOCATOR_ENV}='tcmalloc': expected auto, jemalloc or system"]


def test_a_prefopt_process_runs_the_allocator_it_reports():
    """The entry point maps jemalloc exactly when one is installed (PREFOPT_MALLOC=system keeps it out), and the
    process exits once (the first image's exit handlers never run: exec replaced it)."""
    code = ("import atexit, sys; from prefopt import _alloc; "
            "atexit.register(lambda: sys.stderr.write('allocator=' + _alloc.active_allocator() + '\\n')); "
            "sys.argv = ['prefopt', 'config', '--preset', 'smoke', '--json']; "
            "from prefopt.__main__ import main; main()")
    for choice, expected in (("auto", "jemalloc" if _alloc.find_jemalloc() else "system"), ("system", "system")):
        env = {k: v for k, v in os.environ.items() if k not in (_alloc._REEXEC_MARK, "LD_PRELOAD")}
        env[ALLOCATOR_ENV] = choice
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        assert [ln for ln in res.stderr.splitlines() if ln.startswith("allocator=")] == [f"allocator={expected}"]
        assert '"seed"' in res.stdout
