"""The shared cross-framework benchmark of jax_dilated and torch_ref: ``python -m benchmarks``.

From the command to the kernel, four files: ``__main__`` -> :mod:`benchmarks.cli` (choose the cases,
print and write the report) -> :mod:`benchmarks.runner` (one subprocess per case; the worker times
it) -> :mod:`benchmarks.variants` (the registry: each variant's builder calls ``jax_dilated`` or
``torch_ref``).

The other modules, one concept each, imported in this order (none imports a later one):

- ``case``     plain data: :class:`~benchmarks.case.Case`, :class:`~benchmarks.case.Measurement`, the
  status and failure-kind enums;
- ``flops``    useful floating-point work as formulas of the shapes;
- ``variants`` the typed registry of variants and their builders (the decode step among them; and the
  rows planned for later);
- ``runner``   the fresh-subprocess harness: timing, memory, failures, timeouts, the progress bar;
- ``rows``     result rows (the objects of ``results.json``) from a case and its measurement;
- ``plan``     which cases each section of a run holds (main, modes, peak, shapes, decode);
- ``seed``     the seed package's published table and the cases that rerun its configuration;
- ``report``   tables, figures, results.json/results.csv and REPORT.md;
- ``cli``      the command line that ties them together;
- ``ring_scaling`` ring attention on 1-8 simulated devices, through the same runner (``make figures``).
- ``ring_documents`` what ``document_ids`` cost the ring (one process, run by hand; imports only ``runner``).

Importing this package imports neither JAX nor torch: each case imports only its own framework,
inside its own subprocess.
"""
