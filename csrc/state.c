/*
 * state.c - a pair's state: reading it, and the states' names.
 *
 * Layer 3 (with tracklock.c): calls nothing of pymirror's.
 */
#include "layout.h"

int pm_pair_state(const pm_pair *p)
{
    /* acquire: a reader that sees a new state also sees the tables the
     * command or the job's end set up before publishing it (release) */
    return pm_load_acquire(&((pm_pair *)p)->state);
}

static const char *const state_names[] = {
    "new", "syncing", "established", "split", "restoring", "restored", "detached",
};

const char *pm_state_name(int state)
{
    if (state < 0 || state > PM_STATE_DETACHED)
        return "unknown";
    return state_names[state];
}
