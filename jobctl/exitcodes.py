"""jobctl's exit codes, one per kind of outcome (docs/jobctl.md, the man page's EXIT STATUS)."""

EXIT_OK = 0
EXIT_FAILED = 1        # a command was refused, or the job failed / was cancelled
EXIT_USAGE = 2         # bad command line
EXIT_CONNECT = 3       # cannot connect to, or lost, the control server
EXIT_TIMEOUT = 4       # a wait or a reply timed out
EXIT_INTERRUPTED = 130
