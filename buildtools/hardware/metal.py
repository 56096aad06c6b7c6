"""Metal: Apple-silicon GPUs on macOS.

Every Apple-silicon Mac has a Metal GPU, so the platform alone decides. No
shader compiler is needed at build time either: ggml embeds its Metal
source in the binary (``GGML_METAL_EMBED_LIBRARY``, on by default) and the
OS compiles it when the server starts. Intel Macs are left out on purpose:
ggml's Metal kernels are written for Apple GPUs (SIMD-group reductions and
matrix ops of the Apple7+ family), not for Intel Macs' AMD/Intel GPUs.
"""

from __future__ import annotations

from buildtools.hardware._model import Backend, BackendStatus, GpuInfo
from buildtools.hardware._probe import BackendReport, ProbeContext, missing_build_tools

__all__ = ["MetalBackend"]


class MetalBackend:
    """Metal: available on macOS arm64."""

    backend = Backend.METAL

    def probe(self, ctx: ProbeContext) -> BackendReport:
        plat = ctx.platform
        if plat.system != "darwin":
            return self._no(
                f"Metal needs macOS on Apple silicon; this is {plat.system} {plat.machine}"
            )
        if plat.machine != "arm64":
            rosetta = [n for n in ctx.cpu.notes if "Rosetta" in n]
            why = rosetta[0] if rosetta else f"this Mac is {plat.machine}, not Apple silicon"
            return self._no(f"Metal builds need Apple silicon: {why}")
        if missing := missing_build_tools(ctx):
            return self._no(missing)
        # Unified memory: the GPU's share (recommendedMaxWorkingSetSize) is only
        # known to Metal itself, so memory_bytes stays unknown rather than wrong.
        model = ctx.cpu.model if ctx.cpu.model != "unknown" else "Apple"
        gpu = GpuInfo(vendor="apple", name=f"{model} GPU")
        status = BackendStatus(
            backend=self.backend,
            available=True,
            reason=f"{ctx.cpu.model} on macOS arm64 (ggml embeds its Metal shaders)",
        )
        return BackendReport(status=status, gpus=(gpu,))

    def _no(self, reason: str) -> BackendReport:
        return BackendReport(
            status=BackendStatus(backend=self.backend, available=False, reason=reason)
        )
