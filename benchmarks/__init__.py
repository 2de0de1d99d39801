"""The shared cross-framework benchmark of jax_dilated and torch_ref: ``python -m benchmarks``.

Modules, one concept each:

- ``case``     the description of one measurement (:class:`Case`) and its result row (:class:`Row`);
- ``flops``    the useful floating-point work of a case;
- ``variants`` builders that turn a case into a ready-to-time step, per framework;
- ``runner``   the fresh-subprocess harness: timing, memory, failures and timeouts;
- ``seed``     parsing the seed package's published table and the comparison configuration;
- ``report``   tables, plots, results.json/results.csv and REPORT.md;
- ``cli``      the command line that ties them together.

Importing this package imports neither JAX nor torch: each case imports only its own framework,
inside its own subprocess.
"""
