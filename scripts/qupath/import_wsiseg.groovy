/**
 * Import wsiseg tumour contours into each image of a QuPath project (QuPath 0.4 – 0.7).
 *
 * Run with: Automate → Script editor → File → Open this script → Run → Run for project
 * (Run for project saves every image afterwards).
 *
 * For the current image it looks in WSISEG_DIR for
 *     <image name without extension>.geojson          (written by `wsiseg run`)
 *     <image name without extension>.r<k>.geojson     (written by `wsiseg refine`, round k)
 * (also .geojson.gz) and takes the latest round. It removes the wsiseg contours imported
 * before (annotations whose metadata source is "wsiseg", or whose class is AI_CLASS), adds
 * the new ones and keeps them locked, so brush scribbles drawn over them start new
 * annotations instead of growing the contour.
 *
 * Export your scribbles (export_scribbles.groovy) BEFORE importing a new round: the previous
 * AI contours, edited or not, are replaced.
 */

import java.util.regex.Pattern

import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO

// ---- settings --------------------------------------------------------------------------
// Folder holding the contours: the `--out` folder of `wsiseg run`, or a copy of it.
// Default: a folder named 'wsiseg' inside the QuPath project folder.
def WSISEG_DIR = buildFilePath(PROJECT_BASE_DIR, 'wsiseg')
// Class of the AI contours: the workflow's `contours.class_name`.
def AI_CLASS = 'Tumor (AI)'
// ----------------------------------------------------------------------------------------

def SOURCE = 'wsiseg'   // metadata "source" of every contour wsiseg writes

def imageName = getProjectEntry() != null ? getProjectEntry().getImageName() : getCurrentServer().getMetadata().getName()
def dir = new File(WSISEG_DIR)
if (!dir.isDirectory()) {
    println "wsiseg: folder not found: ${dir} (set WSISEG_DIR at the top of the script)"
    return
}

// The name wsiseg gives a slide is its file name without extension; QuPath's image name may
// also carry a multi-file extension (.ome.tiff) or a series suffix, so try a few spellings.
def candidates = [
    getCurrentImageNameWithoutExtension(),
    GeneralTools.stripExtension(imageName),
    imageName.contains('.') ? imageName.substring(0, imageName.indexOf('.')) : imageName,
    imageName,
].unique()

File chosen = null
int chosenRound = -1
for (base in candidates) {
    def pattern = Pattern.compile('^' + Pattern.quote(base) + '(?:\\.r(\\d+))?\\.geojson(?:\\.gz)?$')
    for (file in dir.listFiles()) {
        def m = pattern.matcher(file.getName())
        if (!m.matches())
            continue
        int round = m.group(1) == null ? 0 : Integer.parseInt(m.group(1))
        if (round > chosenRound) {
            chosen = file
            chosenRound = round
        }
    }
    if (chosen != null)
        break
}
if (chosen == null) {
    println "wsiseg: ${imageName}: no contours in ${dir} (looked for ${candidates.collect { it + '.geojson' }.join(', ')})"
    return
}

def objects = PathIO.readObjects(chosen).findAll { it.isAnnotation() }
objects.each { it.setLocked(true) }

// Sanity check of the frame: contours beyond the image mean the slide was read with another
// offset (OpenSlide bounds crop, rotated/flipped entry) than wsiseg assumed.
def server = getCurrentServer()
def outside = objects.count {
    def roi = it.getROI()
    roi.getBoundsX() < -1 || roi.getBoundsY() < -1 ||
        roi.getBoundsX() + roi.getBoundsWidth() > server.getWidth() + 1 ||
        roi.getBoundsY() + roi.getBoundsHeight() > server.getHeight() + 1
}

def previous = getAnnotationObjects().findAll { isWsiseg(it, AI_CLASS, SOURCE) }
removeObjects(previous, true)   // true: keep child objects (scribbles nested inside a contour)
addObjects(objects)

println "wsiseg: ${imageName}: ${previous.size()} old contour(s) removed, " +
        "${objects.size()} imported from ${chosen.getName()} (locked)"
if (outside > 0)
    println "wsiseg: WARNING ${imageName}: ${outside} contour(s) extend beyond the " +
            "${server.getWidth()} x ${server.getHeight()} image; server: ${server.getPath()}"


/** Our own contours: class AI_CLASS, or metadata source "wsiseg" (QuPath ≥ 0.5). */
boolean isWsiseg(pathObject, String aiClass, String source) {
    def pathClass = pathObject.getPathClass()
    if (pathClass != null && pathClass.toString() == aiClass)
        return true
    try {
        def metadata = pathObject.getMetadata()
        return metadata != null && metadata.get('source') == source
    } catch (MissingMethodException ignored) {
        return false   // QuPath 0.4 keeps no metadata on annotations
    }
}
