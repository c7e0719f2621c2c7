-- 002: an operator can halt an instrument (events "halted"/"resumed"); the flag is part of the
-- engine state, so recovery restores it with the counters.
ALTER TABLE engine_progress ADD COLUMN halted boolean NOT NULL DEFAULT false;
