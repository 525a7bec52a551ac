"""Fault injection and hostile-input harnesses for the jobs in ``jobs/`` (issue 14); not part of the ``pema``
package (for example ``python faults/fuzz_inputs.py --seed 0 --count 500 --report outputs/faults/fuzz_inputs.json``)."""
