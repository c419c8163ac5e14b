"""What one call of a function asks of the GPU, read from torch.profiler: its launches (kernels,
memsets, copies) and their summed device time.

Beside a wall-clock timing, the device time says whether a step is bound by the GPU (device
time close to the wall time: no engine can make it much faster) or by the host (device time
far below it: fewer launches or a CUDA graph can). Launches that overlap on several streams
are summed, so the device time can exceed the wall time.
"""

import torch


def gpu_work(fn, calls: int = 1) -> tuple[float, float] | None:
    """``(launches, device microseconds)`` per call of ``fn``, averaged over ``calls`` calls (None without
    CUDA, or when the profiler records no device activity)."""
    if not torch.cuda.is_available():
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    if not events:  # the profiler saw no device activity (no CUPTI): nothing measured, not zero work
        return None
    return len(events) / calls, sum(e.time_range.elapsed_us() for e in events) / calls
