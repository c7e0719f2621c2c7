-- 003: an operator can halt an instrument (events "halted"/"resumed"); the flag is part of the
-- engine state, so recovery restores it with the counters.
ALTER TABLE engine_progress ADD COLUMN halted boolean NOT NULL DEFAULT false;
-- exchange_commit_batch (002) leaves the column as it is: a batch that halts or resumes takes the
-- multi-statement path, which writes it (exchange/adapters/postgres.py).
