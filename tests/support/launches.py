"""Counting kernel launches in tests: stand in for a Triton kernel object."""


class LaunchCounter:
    """Stands in for a kernel object and counts launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]
