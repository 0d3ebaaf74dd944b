"""What a person reads offline: the ``lightning-htsr`` command line (``cli``, ``cli_compare``), the HTML report of a
run (``report``) and the table cells, figure files and pages they share (``html``). The top of the house: nothing
imports it but ``__main__``.
"""
