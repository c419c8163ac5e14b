"""Does an error raised inside cdfast._C reach Python as an exception? (gpu_check.sh step "error path")

On the first H200 run (torch 2.11.0+cu130, the machine's own compiler), every C++ exception thrown
by the compiled op (a bad label, a bad shape) killed Python with SIGSEGV instead of raising, while
the same build steps gave clean ValueErrors here with torch 2.14.1, and with torch 2.11.0 built here
(gcc 12, CPU-only and CUDA builds). Each case runs in a child process;
the first one that dies by a signal is re-run under a debugger (gdb, else cuda-gdb, which also
debugs host-only programs; gpu_check.sh puts CUDA's bin folder on PATH) for a native backtrace. Exits 1 if any case crashed or did not raise the expected error.
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

OP = "torch.ops.cdfast.competitive_ce(z, y, None, None)"
# cdfast._C alone, without the package (and the Triton, DALI, ... imports it brings): dlopen runs the
# library's op registrations. {library} is filled in by main() (the case is left out without one).
LIBRARY_ONLY = "torch.ops.load_library({library!r})"
CASES = {  # name: (what to import first, the code that must raise)
    # torch's own C++ error first, without and with cdfast loaded: if the first crashes, the machine
    # is at fault; if only the second, something cdfast loads breaks C++ exceptions for everyone
    "torch's own error, torch alone": ("", "torch.mm(torch.ones(2, 2), torch.ones(3, 3))"),
    "torch's own error, CPU": ("import cdfast", "torch.mm(torch.ones(2, 2), torch.ones(3, 3))"),
    "bad label, CPU": ("import cdfast", f"z = torch.randn(2, 4, 10); y = torch.full((2, 4), 10); {OP}"),
    "bad label, CPU, cdfast._C alone": (LIBRARY_ONLY, f"z = torch.randn(2, 4, 10); y = torch.full((2, 4), 10); {OP}"),
    "bad label, CPU, requires grad": ("import cdfast", f"z = torch.randn(2, 4, 10, requires_grad=True); "
                                      f"y = torch.full((2, 4), 10); {OP}"),
    "bad shape, CPU": ("import cdfast", f"z = torch.randn(2, 4, 10); y = torch.zeros(3, dtype=torch.long); {OP}"),
    "bad shape, CUDA": ("import cdfast", f"z = torch.randn(2, 4, 10, device='cuda'); "
                        f"y = torch.zeros(3, dtype=torch.long, device='cuda'); {OP}"),
}
TEMPLATE = """
import torch
{imports}
try:
    {code}
except (ValueError, RuntimeError) as e:
    print(f"raised {{type(e).__name__}}:", str(e).splitlines()[0])
else:
    raise SystemExit("no error raised")
"""


def main() -> int:
    import torch

    spec = importlib.util.find_spec("cdfast")  # finds the package without importing it
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))) if spec and spec.origin else []
    if not found:
        print("no cdfast/_C*.so beside the package: the 'cdfast._C alone' case is left out", flush=True)
    cases = {name: (imports.format(library=found[0]) if imports == LIBRARY_ONLY else imports, code)
             for name, (imports, code) in CASES.items() if found or imports != LIBRARY_ONLY}
    debugger = shutil.which("gdb") or shutil.which("cuda-gdb") or shutil.which("cuda-gdb", path="/usr/local/cuda/bin")
    commands = {name: [sys.executable, "-X", "faulthandler", "-c", TEMPLATE.format(imports=imports, code=code)]
                for name, (imports, code) in cases.items() if "cuda" not in code or torch.cuda.is_available()}
    # all cases at once (each is a fresh interpreter importing torch: seconds each, one after another)
    running = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, cmd in commands.items()}
    bad, traced = 0, False
    for name, proc in running.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n(timed out after 120 s)"
        print(f"{name}: exit {proc.returncode}: {out.strip() or err.strip()[-600:]}", flush=True)
        if proc.returncode != 0:
            bad += 1
            if proc.returncode < 0 and debugger and not traced:  # one backtrace: a debugger run takes long
                traced = True
                try:
                    trace = subprocess.run([debugger, "-batch", "-ex", "run", "-ex", "bt 40", "--args"] + commands[name],
                                           capture_output=True, text=True, timeout=45).stdout
                except subprocess.TimeoutExpired as e:  # what it printed so far
                    trace = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "") + "\n(timed out)"
                print(f"--- {debugger} backtrace of {name!r}:\n{trace[-8000:]}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
