"""Loop-stall watchdog, a diagnostic for the benchmarks (issue 15's late heartbeats): when LOOPWATCH_DIR is set,
every process that makes a uvloop loop ticks it every 20 ms; a thread samples the main thread's stack while a
tick is over 80 ms late and writes each stall's duration, the main thread's CPU time in it, and the stacks seen
most to LOOPWATCH_DIR/<pid>.txt. A stack is seen only when the main thread lets go of the GIL: one sample in a
long stall means a long C call just before where it shows.

    LOOPWATCH_DIR=/tmp/lw PYTHONPATH=bench/loopwatch .venv/bin/python bench/scale.py
"""
import os
import sys
import threading
import time
import collections
import traceback

_dir = os.environ.get("LOOPWATCH_DIR")
if _dir:
    import uvloop
    _orig = uvloop.new_event_loop
    state = {"tick": None}
    main_id = threading.main_thread().ident

    def _tick(loop):
        state["tick"] = time.monotonic()
        state["cpu"] = time.thread_time()
        loop.call_later(0.02, _tick, loop)

    def _watch():
        out = open(os.path.join(_dir, f"{os.getpid()}.txt"), "a", buffering=1)
        out.write(f"argv {sys.argv}\n")
        stall_start = None
        samples = collections.Counter()
        while True:
            time.sleep(0.01)
            t = state["tick"]
            if t is None:
                continue
            late = time.monotonic() - t
            if late > 0.08:
                if stall_start is None:
                    stall_start = t
                    cpu0 = state["cpu"]
                frame = sys._current_frames().get(main_id)
                if frame is not None:
                    stack = [f for f in traceback.extract_stack(frame) if not f.filename.startswith("<frozen")][-9:]
                    samples["".join(f"  {f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}\n" for f in stack)] += 1
            elif stall_start is not None:
                dur = (state["tick"] - stall_start) * 1000
                cpu = (state["cpu"] - cpu0) * 1000
                out.write(f"STALL {dur:.0f} ms cpu<={cpu:.0f} at {time.time():.2f} mono {time.monotonic():.2f}\n")
                for s, n in samples.most_common(3):
                    out.write(f" [{n}]\n{s}")
                stall_start = None
                samples.clear()

    def new_event_loop():
        loop = _orig()
        loop.call_soon(_tick, loop)
        threading.Thread(target=_watch, daemon=True).start()
        return loop
    uvloop.new_event_loop = new_event_loop
