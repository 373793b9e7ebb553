"""The erasure report's verification: does the served model still say what a target registered to forget?

``probes.py`` builds the questions (the target's own, rephrased by templates, rebuilt from its wordings, with its
aliases swapped, free-form and completion-style probes); ``leaks.py`` scores a reply; ``job.py`` is the
``verify_erasure`` job that asks the served model each probe with and without protection in a serving replica;
``report.py`` assembles a target's report and ``plots.py`` draws its figures. Serving-side code: the evaluation
package may reuse it, never the other way round.
"""
