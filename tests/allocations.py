"""What a step allocates, from the profiler's memory timeline: the tests that claim an op never
forms an ``[out, in]`` tensor read it here."""


def largest_allocation(fn) -> int:
    """The largest single tensor allocation through torch's CPU allocator while ``fn()`` runs
    (allocations inside the extension's kernels included)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    return max(size for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline
               if action == Action.CREATE)
