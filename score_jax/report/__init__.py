"""An HTML report of a run directory or a results root of runs.

  python -m score_jax.report DIR      # writes DIR/report.html, prints its path

The report has the comparison table in the paper's format (Accuracy@t1,
Accuracy@t2, Delta, Delta i->c, Delta c->i) with 95% confidence intervals,
plots of attempt-1 and attempt-2 training reward and of the inference-time
scaling curves (inline SVG, no plotting library), and transcripts of attempt 1
and attempt 2 side by side with the changed lines highlighted.

The modules: runs (reading a run's files), stats (the intervals), table (the
comparison table's rows, as HTML and as Markdown), charts (the SVG plots),
transcripts (attempts side by side), pages (the page and the files that
write_report writes) and __main__ (the command line).
"""
